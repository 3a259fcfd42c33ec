//! Builds the sample components in `sample-services/` for tests, once per process.
//!
//! The components are never checked in: the first test that asks for one runs
//! `cargo build --release --target wasm32-wasip2` in `sample-services/`, and
//! every later call in the same process reuses that result. Several test
//! processes may build at once; cargo's lock on the target directory
//! serialises them, and all but the first find nothing left to do.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Every sample `sample-services/` builds, by the stem of its `.wasm` file.
pub const NAMES: &[&str] = &[
    "hello",
    "echo",
    "spin",
    "hog",
    "panic",
    "sleep",
    "frontend",
    "backend",
    "notcomponent",
    "counter",
    "notes",
    "settings",
    "messenger",
    "listener",
    "job",
    "bulk",
];

/// The target the samples are built for; also names the output subdirectory.
const TARGET: &str = "wasm32-wasip2";

/// Where to build instead of `sample-services/target`, e.g. to share one
/// sample build between several checkouts.
const TARGET_DIR_VAR: &str = "WHARF_SAMPLES_TARGET_DIR";

/// Variables that would carry the settings of the build running the tests
/// into the sample build: its target directory, its flags (which may be
/// native-only, such as coverage instrumentation) or its target triple.
const LEAKING_VARS: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "RUSTC_WORKSPACE_WRAPPER",
];

/// Prefixes of the cargo configuration variables with the same problem:
/// `CARGO_BUILD_*` (target, target-dir, rustflags), `CARGO_TARGET_*`
/// (`CARGO_TARGET_DIR` and per-target runners and flags) and
/// `CARGO_PROFILE_*` (the samples' release profile is part of their design).
const LEAKING_PREFIXES: &[&str] = &["CARGO_BUILD_", "CARGO_TARGET_", "CARGO_PROFILE_"];

/// The outcome of this process's one build: the output directory, or why there is none.
static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Builds every sample once per process (cargo handles cross-process locking) and returns the directory holding the .wasm files.
///
/// # Panics
///
/// If the build fails, with cargo's error output in the message.
pub fn dir() -> &'static Path {
    match BUILT.get_or_init(build) {
        Ok(dir) => dir,
        Err(message) => panic!("{message}"),
    }
}

/// Path of one sample's .wasm, e.g. `path("hello")`.
///
/// # Panics
///
/// If `name` is not one of [`NAMES`] or the build failed.
pub fn path(name: &str) -> PathBuf {
    assert!(
        NAMES.contains(&name),
        "no sample component is called {name:?}; the samples are {NAMES:?} (see sample-services/)"
    );
    let file = dir().join(format!("{name}.wasm"));
    assert!(
        file.is_file(),
        "sample-services built without error but {} is missing; is {name} a member of sample-services/Cargo.toml?",
        file.display()
    );
    file
}

/// Bytes of one sample.
///
/// # Panics
///
/// As [`path`] does, or if the file cannot be read.
pub fn bytes(name: &str) -> Vec<u8> {
    let file = path(name);
    std::fs::read(&file)
        .unwrap_or_else(|error| panic!("cannot read sample {}: {error}", file.display()))
}

/// Runs the sample build and returns the directory its `.wasm` files land in.
fn build() -> Result<PathBuf, String> {
    let sources = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("the testkit crate has no parent directory to find sample-services/ in")?
        .join("sample-services");
    let target_dir = match std::env::var_os(TARGET_DIR_VAR) {
        // Absolute, because cargo reads a relative --target-dir from
        // sample-services/ while our callers read it from their own cwd.
        Some(dir) => std::path::absolute(&dir)
            .map_err(|error| format!("{TARGET_DIR_VAR}={}: {error}", Path::new(&dir).display()))?,
        None => sources.join("target"),
    };
    // `CARGO` is set when running under cargo and names the very cargo (and
    // so toolchain) that built the tests.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    let mut command = Command::new(&cargo);
    command
        .current_dir(&sources)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    for (name, _) in std::env::vars_os() {
        if leaks_into_build(&name) {
            command.env_remove(name);
        }
    }

    let output = command.output().map_err(|error| {
        format!(
            "cannot run {} to build the sample components: {error}",
            Path::new(&cargo).display()
        )
    })?;
    if !output.status.success() {
        return Err(format!(
            "building the sample components failed ({}) with\n  (cd {} && cargo build --release --target {TARGET} --target-dir {})\n\
             If the target is missing: rustup target add {TARGET}\n\
             cargo said:\n{}",
            output.status,
            sources.display(),
            target_dir.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(target_dir.join(TARGET).join("release"))
}

/// Whether an environment variable of this process must not reach the sample build.
fn leaks_into_build(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    LEAKING_VARS.contains(&name)
        || LEAKING_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component (not a core module) starts with the wasm magic number and
    /// then version 0x0d with layer 1.
    const COMPONENT_PREAMBLE: &[u8] = b"\0asm\x0d\x00\x01\x00";

    #[test]
    fn every_sample_builds_as_a_component() {
        for name in NAMES {
            let bytes = bytes(name);
            assert!(
                bytes.starts_with(COMPONENT_PREAMBLE),
                "{name}.wasm does not start with the component preamble; it starts with {:02x?}",
                &bytes[..bytes.len().min(8)]
            );
        }
    }

    #[test]
    fn host_build_settings_are_kept_out() {
        for name in [
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
            "RUSTFLAGS",
            "CARGO_PROFILE_RELEASE_LTO",
        ] {
            assert!(leaks_into_build(OsStr::new(name)), "{name}");
        }
        for name in ["CARGO_HOME", "PATH", "RUSTUP_TOOLCHAIN"] {
            assert!(!leaks_into_build(OsStr::new(name)), "{name}");
        }
    }
}
