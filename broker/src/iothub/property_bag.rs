//! Property bags: a message's properties carried in its MQTT topic (edgehub-contract.md §1.4).
//!
//! ```text
//! bag  = pair *("&" pair)
//! pair = escape(key) ["=" escape(value)]     escape = RFC 3986: keep A-Z a-z 0-9 - . _ ~
//! ```
//!
//! The decoder reads a bag as edgeHub's (the C# SDK's `UrlEncodedDictionarySerializer`) does: a
//! `/` ends it, `&` separates pairs, the first `=` separates a key from its value, a key with no
//! `=` has no value, every `?` is dropped, `+` is not a space, an escape that is not UTF-8 stays
//! as written, and a trailing `&` ends the bag. A second raw `=` in a pair, a pair that starts
//! with `=`, or an empty pair inside the bag is malformed. The encoder always writes
//! `key=value` (the Python SDK's decoder fails on a bare key), percent-encoding as
//! `Uri.EscapeDataString` does, with upper-case hex.

use crate::routing::topic::split_ascii;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use std::borrow::Cow;

/// What `Uri.EscapeDataString` leaves alone: RFC 3986's unreserved characters.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Properties in the order they came; a key with no `=` has no value. Each borrows the bag
/// unless it had to be unescaped.
pub type Properties<'a> = Vec<(Cow<'a, str>, Option<Cow<'a, str>>)>;

/// Why a property bag could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BagError {
    #[error("property {0} is empty (two '&' in a row, or a leading '&')")]
    EmptyPair(usize),
    #[error("property {0} has no key (it starts with '=')")]
    NoKey(usize),
    #[error("property {0} has a second '=' that is not percent-encoded")]
    SecondEquals(usize),
}

/// Reads a property bag: up to its first `/`, if any.
///
/// # Errors
/// What is malformed, naming the property (counted from 1).
pub fn decode(bag: &str) -> Result<Properties<'_>, BagError> {
    let bag = split_ascii(bag, b'/').next().unwrap_or_default();
    if bag.is_empty() {
        return Ok(Vec::new());
    }
    // Room for the usual few properties at once.
    let mut properties = Vec::with_capacity(4);
    for (index, pair) in split_ascii(bag, b'&').enumerate() {
        let number = index + 1;
        if pair.as_bytes().contains(&b'?') {
            // Rare: the `?`s go, so the pair is read from a copy.
            let pair = pair.replace('?', "");
            let owned = |text: Cow<'_, str>| Cow::Owned(text.into_owned());
            match read_pair(&pair, index, bag, number)? {
                Some((key, value)) => properties.push((owned(key), value.map(owned))),
                None => continue,
            }
            continue;
        }
        if let Some(read) = read_pair(pair, index, bag, number)? {
            properties.push(read);
        }
    }
    Ok(properties)
}

/// One pair of `bag` (its `index`th, `number` counted from 1), its `?`s gone: its key and value
/// unescaped, or `None` for an empty pair the SDKs' decoder skips.
#[allow(clippy::type_complexity)]
fn read_pair<'p>(
    pair: &'p str,
    index: usize,
    bag: &str,
    number: usize,
) -> Result<Option<(Cow<'p, str>, Option<Cow<'p, str>>)>, BagError> {
    {
        if pair.is_empty() {
            // `?` alone (as in `/?k=v`) is dropped with the rest of the `?`s, and a trailing
            // `&` ends the bag, as the SDKs' decoder reads them.
            let last = index + 1 == split_ascii(bag, b'&').count();
            if (index == 0 && bag.starts_with('?')) || (last && index > 0) {
                return Ok(None);
            }
            return Err(BagError::EmptyPair(number));
        }
        let mut parts = split_ascii(pair, b'=');
        let key = parts.next().unwrap_or_default();
        let value = parts.next();
        if parts.next().is_some() {
            return Err(BagError::SecondEquals(number));
        }
        if key.is_empty() {
            return Err(BagError::NoKey(number));
        }
        // An escape that does not decode to UTF-8 stays as written, as .NET's
        // `Uri.UnescapeDataString` leaves it.
        let unescape = |text: &'p str| {
            if !text.as_bytes().contains(&b'%') {
                return Cow::Borrowed(text); // nothing to unescape, and UTF-8 already
            }
            match percent_decode_str(text).decode_utf8() {
                Ok(decoded) => decoded,
                Err(_) => Cow::Borrowed(text),
            }
        };
        Ok(Some((unescape(key), value.map(unescape))))
    }
}

/// Writes a property bag, every pair as `key=value` (a property with no value gets an empty
/// one).
#[must_use]
pub fn encode<'a>(properties: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut bag = String::new();
    encode_into(&mut bag, properties);
    bag
}

/// Appends a property bag to `out`, as [`encode`] writes it.
pub fn encode_into<'a>(out: &mut String, properties: impl IntoIterator<Item = (&'a str, &'a str)>) {
    for (i, (key, value)) in properties.into_iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.extend(utf8_percent_encode(key, UNRESERVED));
        out.push('=');
        out.extend(utf8_percent_encode(value, UNRESERVED));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pairs<'a>(properties: &'a Properties<'_>) -> Vec<(&'a str, Option<&'a str>)> {
        properties
            .iter()
            .map(|(k, v)| (k.as_ref(), v.as_deref()))
            .collect()
    }

    /// Goal: the bags the SDKs send (contract §1.4 and §12) decode to their properties.
    #[test]
    fn the_sdks_bags_decode() {
        let python = "%24.on=out1&%24.mid=mid-1&%24.cid=cid-1&%24.ct=application%2Fjson\
                      &%24.ce=utf-8&alpha=a%26b%3Dc%2Fd&k1=v%201";
        let decoded = decode(python).expect("decodes");
        assert_eq!(
            pairs(&decoded),
            vec![
                ("$.on", Some("out1")),
                ("$.mid", Some("mid-1")),
                ("$.cid", Some("cid-1")),
                ("$.ct", Some("application/json")),
                ("$.ce", Some("utf-8")),
                ("alpha", Some("a&b=c/d")),
                ("k1", Some("v 1")),
            ]
        );
        let csharp = "%24.on=alerts&%24.mid=m-1&temp=31.5/";
        assert_eq!(
            decode(csharp).expect("decodes").len(),
            3,
            "a '/' ends the bag"
        );
        let question = "?k=v&flag";
        assert_eq!(
            pairs(&decode(question).expect("decodes")),
            vec![("k", Some("v")), ("flag", None)]
        );
        assert_eq!(
            pairs(&decode("a+b=c+d").expect("decodes")),
            vec![("a+b", Some("c+d"))]
        );
        assert!(decode("").expect("empty").is_empty());
    }

    /// Goal: what edgeHub's decoder refuses is refused, saying which property.
    #[test]
    fn malformed_bags_are_refused() {
        assert_eq!(decode("a=1&&b=2"), Err(BagError::EmptyPair(2)));
        assert_eq!(decode("&a=1"), Err(BagError::EmptyPair(1)));
        assert_eq!(decode("=v"), Err(BagError::NoKey(1)));
        assert_eq!(decode("a=1&b=2=3"), Err(BagError::SecondEquals(2)));
        assert_eq!(
            pairs(&decode("a=%FF&b=1&").expect("lenient")),
            vec![("a", Some("%FF")), ("b", Some("1"))],
            "a bad escape stays as written; a trailing '&' ends the bag"
        );
    }

    /// Goal: the encoder writes what the C# SDK writes: RFC 3986 escapes in upper-case hex,
    /// and `key=value` always.
    #[test]
    fn bags_encode_as_escape_data_string_does() {
        let bag = encode([("temp", "31.5"), ("$.mid", "m 1"), ("k", "a&b=c/d;é~")]);
        assert_eq!(bag, "temp=31.5&%24.mid=m%201&k=a%26b%3Dc%2Fd%3B%C3%A9~");
        assert_eq!(encode([("bare", "")]), "bare=");
    }

    proptest! {
        /// Goal: any properties round-trip through `encode` and `decode`.
        #[test]
        fn bags_round_trip(properties in proptest::collection::vec((".{1,12}", ".{0,12}"), 0..8)) {
            let bag = encode(properties.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let decoded = decode(&bag).expect("an encoded bag decodes");
            // A `?` is encoded (%3F), so the decoder's dropping of raw ones takes nothing.
            let expected: Vec<(&str, Option<&str>)> =
                properties.iter().map(|(k, v)| (k.as_str(), Some(v.as_str()))).collect();
            prop_assert_eq!(pairs(&decoded), expected);
        }

        /// Goal: arbitrary input decodes or is refused; none panics.
        #[test]
        fn arbitrary_bags_never_panic(bag in ".{0,200}") {
            let _ = decode(&bag);
        }
    }
}
