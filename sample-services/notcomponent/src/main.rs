//! `notcomponent`: a wasi:cli command rather than a wasi:http component, which hosts must refuse to serve.

fn main() {
    println!("notcomponent: a command, not an HTTP handler");
}
