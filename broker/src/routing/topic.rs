//! MQTT topic names and topic filters: validation and matching (MQTT 3.1.1 §4.7, 5.0 §4.7).

use crate::limits::TOPIC_LEVELS_MAX;

/// Why a topic name or filter is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic contains a NUL character")]
    Nul,
    #[error("topic name contains a wildcard")]
    WildcardInName,
    #[error("'#' must be the last level of a filter, alone")]
    MultiLevelMisplaced,
    #[error("'+' must fill a whole level")]
    SingleLevelMisplaced,
    #[error("topic has more than {TOPIC_LEVELS_MAX} levels")]
    TooDeep,
}

/// Checks a topic name used in PUBLISH.
///
/// # Errors
/// Why the name is invalid.
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    check_common(name)?;
    // Every publish's topic is checked: bytes, not characters (`+` and `#` are ASCII, so no
    // byte of a multi-byte character is one).
    if name.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter used in SUBSCRIBE or UNSUBSCRIBE.
///
/// # Errors
/// Why the filter is invalid.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(TopicError::MultiLevelMisplaced);
        }
        if level.contains('+') && *level != "+" {
            return Err(TopicError::SingleLevelMisplaced);
        }
    }
    Ok(())
}

fn check_common(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    let mut levels = 1;
    for byte in topic.bytes() {
        match byte {
            0 => return Err(TopicError::Nul),
            b'/' => levels += 1,
            _ => {}
        }
    }
    if levels > TOPIC_LEVELS_MAX {
        return Err(TopicError::TooDeep);
    }
    Ok(())
}

/// `text` split at every `separator`, an ASCII byte: every topic's levels and every property
/// of every telemetry message are read with it, so it looks at bytes, not characters (an
/// ASCII byte is never part of a multi-byte character, so every piece is a whole `str`).
pub fn split_ascii(text: &str, separator: u8) -> impl Iterator<Item = &str> {
    debug_assert!(separator.is_ascii());
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.bytes().position(|byte| byte == separator) {
            Some(at) => {
                rest = Some(&current[at + 1..]);
                Some(&current[..at])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

/// Whether a (valid) filter matches a (valid) topic name. Filters starting with a wildcard do
/// not match names starting with `$` (MQTT §4.7.2), so `#` does not see `$SYS/...`.
#[must_use]
pub fn matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut names = name.split('/');
    for level in filter.split('/') {
        match level {
            "#" => return true,
            "+" => {
                if names.next().is_none() {
                    return false;
                }
            }
            literal => {
                if names.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    names.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wildcards_match_by_the_spec() {
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(matches("a/+", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/+/c", "a/b/c"));
        assert!(matches("a/#", "a"), "# also matches the parent level");
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(matches("+/+", "/a"), "empty levels are levels");
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
    }

    #[test]
    fn invalid_filters_and_names_are_refused() {
        assert_eq!(
            validate_filter("a/#/b"),
            Err(TopicError::MultiLevelMisplaced)
        );
        assert_eq!(validate_filter("a#"), Err(TopicError::MultiLevelMisplaced));
        assert_eq!(
            validate_filter("a+/b"),
            Err(TopicError::SingleLevelMisplaced)
        );
        assert_eq!(validate_filter(""), Err(TopicError::Empty));
        assert!(validate_filter("+/a/#").is_ok());
        assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a\0b"), Err(TopicError::Nul));
        assert!(validate_name("a//b").is_ok());
    }

    proptest! {
        /// Goal: every name matches itself as a filter, and "#" and its own levels as "+".
        #[test]
        fn names_match_themselves(levels in proptest::collection::vec("[a-z0-9]{0,4}", 1..6)) {
            let name = levels.join("/");
            prop_assert!(matches(&name, &name));
            prop_assert!(matches("#", &name));
            let plus = vec!["+"; levels.len()].join("/");
            prop_assert!(matches(&plus, &name));
        }

        #[test]
        fn validation_never_panics(topic in "\\PC{0,30}") {
            let _ = validate_name(&topic);
            let _ = validate_filter(&topic);
        }
    }
}
