//! The syntax of subjects, KV keys and bucket names, checked the same way for both implementations.
//!
//! NATS checks some of these rules late (an invalid subscription is refused
//! by the server asynchronously, after `subscribe` has returned) and some not
//! at all (it delivers a publish to `a.*` literally). Checking here, before
//! either implementation is called, gives every caller the same clear error in
//! single-node mode and over NATS. [`matches`] is NATS' wildcard matching, used
//! by the in-process implementation for subscriptions and KV watches.

use crate::error::NameError;

/// Checks a subject to publish to: dot-separated non-empty tokens, no whitespace, no wildcards.
pub(crate) fn check_subject(subject: &str) -> Result<(), NameError> {
    check_tokens(subject, "subject", false, |_| true)
}

/// Checks a subject to subscribe to: like [`check_subject`], but a token may
/// be `*` (exactly one token) and the last token may be `>` (one or more tokens).
pub(crate) fn check_pattern(pattern: &str) -> Result<(), NameError> {
    check_tokens(pattern, "subject", true, |_| true)
}

/// Checks a queue group name: non-empty, no whitespace (NATS' rule).
pub(crate) fn check_queue_group(group: &str) -> Result<(), NameError> {
    if group.is_empty() {
        return Err(invalid("queue group", group, "it is empty"));
    }
    if group.chars().any(char::is_whitespace) {
        return Err(invalid("queue group", group, "it contains whitespace"));
    }
    Ok(())
}

/// The longest KV key, in bytes. A key travels in a NATS subject, and a
/// protocol line over the server's 4 KiB `max_control_line` makes it close
/// the whole connection (every request on it fails); this leaves room for
/// the `$KV.<bucket>.` prefix and a reply subject.
pub(crate) const MAX_KEY_LEN: usize = 3584;

/// Checks a KV key: at most [`MAX_KEY_LEN`] bytes of the characters NATS KV
/// allows (`a-z A-Z 0-9 - / _ = .`), with `.` separating non-empty tokens as in subjects.
pub(crate) fn check_key(key: &str) -> Result<(), NameError> {
    if key.len() > MAX_KEY_LEN {
        let shown: String = key.chars().take(64).collect();
        return Err(invalid("key", &format!("{shown}…"), "it is longer than 3,584 bytes, the most a key may be"));
    }
    check_tokens(key, "key", false, is_key_char)
}

/// Checks a KV key pattern to watch: a key whose tokens may also be `*` or, last, `>`.
pub(crate) fn check_key_pattern(pattern: &str) -> Result<(), NameError> {
    check_tokens(pattern, "key pattern", true, is_key_char)
}

/// Checks a KV or object bucket name: letters, digits, `-` and `_` (NATS' rule, as it names a stream).
pub(crate) fn check_bucket(bucket: &str) -> Result<(), NameError> {
    if bucket.is_empty() {
        return Err(invalid("bucket name", bucket, "it is empty"));
    }
    if !bucket
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid(
            "bucket name",
            bucket,
            "only letters, digits, `-` and `_` are allowed",
        ));
    }
    Ok(())
}

/// Checks an object name: any non-empty string (the object store encodes names itself).
pub(crate) fn check_object_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(invalid("object name", name, "it is empty"));
    }
    Ok(())
}

/// Whether `subject` matches `pattern` by NATS' rules: tokens are compared
/// literally, except that `*` matches any one token and a final `>` matches
/// one or more. Both arguments are assumed to have passed the checks above.
pub(crate) fn matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in pattern.split('.') {
        if token == ">" {
            return subject_tokens.next().is_some();
        }
        match subject_tokens.next() {
            Some(subject_token) if token == "*" || token == subject_token => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '/' | '_' | '=' | '.')
}

/// The rules subjects and keys share; `allowed` restricts the characters of literal tokens.
fn check_tokens(
    name: &str,
    what: &'static str,
    wildcards: bool,
    allowed: fn(char) -> bool,
) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(invalid(what, name, "it is empty"));
    }
    if name.chars().any(char::is_whitespace) {
        return Err(invalid(what, name, "it contains whitespace"));
    }
    let mut tokens = name.split('.').peekable();
    while let Some(token) = tokens.next() {
        let last = tokens.peek().is_none();
        match token {
            "" => {
                return Err(invalid(
                    what,
                    name,
                    "it has an empty token (a leading, trailing or doubled `.`)",
                ));
            }
            "*" | ">" if !wildcards => {
                return Err(invalid(
                    what,
                    name,
                    "wildcards (`*`, `>`) are only allowed when subscribing or watching",
                ));
            }
            ">" if !last => {
                return Err(invalid(what, name, "`>` may only be the last token"));
            }
            "*" | ">" => {}
            literal if !literal.chars().all(allowed) => {
                return Err(invalid(
                    what,
                    name,
                    "only letters, digits and `-/_=.` are allowed",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn invalid(what: &'static str, name: &str, reason: &'static str) -> NameError {
    NameError {
        what,
        name: name.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_nats() {
        let cases = [
            ("a.b", "a.b", true),
            ("a.b", "a.c", false),
            ("a.*", "a.b", true),
            ("a.*", "a.b.c", false),
            ("a.*", "a", false),
            ("*.b", "a.b", true),
            ("a.>", "a.b", true),
            ("a.>", "a.b.c", true),
            ("a.>", "a", false),
            (">", "a", true),
            (">", "a.b", true),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.b.d", false),
            ("a.b*", "a.bc", false),
            ("a", "a.b", false),
        ];
        for (pattern, subject, expected) in cases {
            assert_eq!(matches(pattern, subject), expected, "{pattern} ~ {subject}");
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(check_subject("wharf.svc.default.hello").is_ok());
        assert!(check_subject("_INBOX.abc.123").is_ok());
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", "a.>"] {
            assert!(check_subject(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_pattern("a.*.c").is_ok());
        assert!(check_pattern("a.>").is_ok());
        assert!(check_pattern("a.>.c").is_err());
        assert!(check_key("svc/default_hello=1.v-2").is_ok());
        for bad in ["", "a:b", "a*", "a.*", ".a", "a..b", "ä"] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_key_pattern("hosts.*").is_ok());
        assert!(check_key_pattern(">").is_ok());
        assert!(check_bucket("wharf-kv-default").is_ok());
        assert!(check_bucket("wharf.kv").is_err());
        assert!(check_queue_group("svc").is_ok());
        assert!(check_queue_group("a b").is_err());
    }

    #[test]
    fn errors_name_the_problem() {
        let err = check_key("a..b").err().map(|err| err.to_string());
        assert_eq!(
            err.as_deref(),
            Some("invalid key `a..b`: it has an empty token (a leading, trailing or doubled `.`)")
        );
    }
}
