//! JSON text written by hand where its layout is fixed and its cost
//! matters: a web batch writes a thousand envelopes, PENDING records and
//! answers per request. Keys and constant values are taskstack's own
//! plain ASCII and are written as they are; a caller's text is copied as
//! it is when it needs no escaping and escaped by serde_json when it does;
//! every other value goes through serde_json. The text is the same as
//! serde_json's for the same members in the same order.

use serde::Serialize;
use serde_json::{Map, Value};
use std::ops::Range;

/// Writes `v` as JSON at the end of `out`; returns where it lies.
pub fn write_value<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) -> Range<usize> {
    let start = out.len();
    serde_json::to_writer(&mut *out, v).expect("JSON values always serialize");
    start..out.len()
}

/// Writes `s` as a JSON string, byte for byte as serde_json does.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    if needs_escaping(s) {
        write_value(out, s);
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// Whether JSON needs `s` escaped: a control character, a quote or a
/// backslash (serde_json escapes exactly these). Scanned 16 bytes at a
/// time without an early exit, which compiles to vector compares: most
/// text (ids, names, queues) has none.
fn needs_escaping(s: &str) -> bool {
    let special = |b: u8| (b < 0x20) | (b == b'"') | (b == b'\\');
    let mut chunks = s.as_bytes().chunks_exact(16);
    let mut found = false;
    for chunk in &mut chunks {
        found |= chunk.iter().fold(false, |any, &b| any | special(b));
    }
    found || chunks.remainder().iter().any(|&b| special(b))
}

/// Writes members whose keys and values are JSON literals: their joined
/// text in one copy when the object has no caller's members, else one by
/// one, so that a caller's member of the same name replaces ours.
macro_rules! fixed {
    ($o:expr, $($key:literal => $json:literal),+ $(,)?) => {{
        let o: &mut $crate::proto::json::Object<'_> = $o;
        if o.has_callers() {
            $( o.raw($key, $json); )+
        } else {
            const RUN: &str = concat!($( ",\"", $key, "\":", $json ),+);
            o.run(&RUN[1..]);
        }
    }};
}
pub(crate) use fixed;

/// A JSON object written member by member.
#[derive(Debug)]
pub struct Object<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
    /// Members the caller gives itself (a message's extra headers):
    /// [`Object::text`], [`Object::string`], [`Object::raw`] and
    /// [`Object::value`] skip these keys.
    callers: Option<&'a Map<String, Value>>,
}

impl<'a> Object<'a> {
    /// Opens an object at the end of `out`.
    pub fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Self {
            out,
            first: true,
            callers: None,
        }
    }

    /// Opens an object whose members named in `callers` are the caller's:
    /// ours of the same name are skipped (see [`Object::any`]).
    pub fn with_callers(out: &'a mut Vec<u8>, callers: Option<&'a Map<String, Value>>) -> Self {
        let mut o = Self::open(out);
        o.callers = callers;
        o
    }

    /// A member whose value is an object, written through the returned
    /// writer (closed by its [`Object::close`]).
    pub fn object(&mut self, key: &str) -> Object<'_> {
        self.key(key);
        Object::open(self.out)
    }

    /// The text written so far.
    pub fn out(&mut self) -> &mut Vec<u8> {
        self.out
    }

    /// Whether the caller gives members of its own (see [`fixed`]).
    pub(crate) fn has_callers(&self) -> bool {
        self.callers.is_some()
    }

    /// Members written already (`"a":1,"b":2`), appended as they are.
    pub(crate) fn run(&mut self, members: &str) {
        self.separate();
        self.out.extend_from_slice(members.as_bytes());
    }

    /// Whether `key` is ours to write (the caller did not give it).
    fn ours(&self, key: &str) -> bool {
        !self.callers.is_some_and(|c| c.contains_key(key))
    }

    fn separate(&mut self) {
        if !std::mem::take(&mut self.first) {
            self.out.push(b',');
        }
    }

    /// `"key":`, for a key that needs no escaping; the value is written
    /// next, straight into [`Object::out`].
    pub fn key(&mut self, key: &str) {
        self.out.reserve(key.len() + 4);
        self.separate();
        self.quoted(key);
        self.out.push(b':');
    }

    /// Text that needs no escaping (checked in debug builds), quoted.
    fn quoted(&mut self, text: &str) {
        debug_assert!(
            text.bytes()
                .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f),
            "{text:?} needs escaping"
        );
        self.out.reserve(text.len() + 2);
        self.out.push(b'"');
        self.out.extend_from_slice(text.as_bytes());
        self.out.push(b'"');
    }

    /// A member whose value is taskstack's own text that needs no escaping.
    pub fn text(&mut self, key: &str, text: &str) {
        if self.ours(key) {
            self.key(key);
            self.quoted(text);
        }
    }

    /// A member whose value is text from outside, escaped as JSON needs.
    pub fn string(&mut self, key: &str, text: &str) {
        if self.ours(key) {
            self.key(key);
            write_str(self.out, text);
        }
    }

    /// A member whose value is the text of `parts` joined, escaped as
    /// JSON needs (a link: a path and an id).
    pub fn joined(&mut self, key: &str, parts: &[&str]) {
        if self.ours(key) {
            self.key(key);
            if parts.iter().any(|p| needs_escaping(p)) {
                write_value(self.out, &parts.concat());
            } else {
                self.out
                    .reserve(parts.iter().map(|p| p.len()).sum::<usize>() + 2);
                self.out.push(b'"');
                for p in parts {
                    self.out.extend_from_slice(p.as_bytes());
                }
                self.out.push(b'"');
            }
        }
    }

    /// A member whose value is a JSON text (`null`, `0`, `{}`).
    pub fn raw(&mut self, key: &str, json: &str) {
        if self.ours(key) {
            self.key(key);
            self.out.extend_from_slice(json.as_bytes());
        }
    }

    /// A member whose value serde_json writes.
    pub fn value<T: Serialize + ?Sized>(&mut self, key: &str, v: &T) {
        if self.ours(key) {
            self.key(key);
            write_value(self.out, v);
        }
    }

    /// A member whose key, too, comes from outside (a caller's header).
    pub fn any(&mut self, key: &str, v: &Value) {
        self.separate();
        write_str(self.out, key);
        self.out.push(b':');
        write_value(self.out, v);
    }

    /// Ends the object.
    pub fn close(self) {
        self.out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fixed_members_are_one_run_without_callers() {
        let mut out = Vec::new();
        let mut o = Object::open(&mut out);
        o.text("a", "b");
        fixed!(&mut o, "x" => "1", "y" => "\"z\"");
        let mut inner = o.object("i");
        fixed!(&mut inner, "only" => "[]");
        inner.close();
        o.close();
        assert_eq!(
            String::from_utf8(out).expect("UTF-8"),
            r#"{"a":"b","x":1,"y":"z","i":{"only":[]}}"#
        );
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        for s in [
            "",
            "plain",
            "9f0c6a1e-2b7d-4c1f-8e3a-5d6b7c8d9e0f",
            "quote \" inside",
            "back\\slash",
            "tab\tand\nnewline\r",
            "\u{0}\u{1f}",
            "del \u{7f} stays",
            "non-ASCII é ✓ 🙂",
            "a long text without anything to escape, longer than one vector lane of the scan",
            "a long text with one escape at its very end, past the first lanes of the scan\"",
        ] {
            let mut out = Vec::new();
            write_str(&mut out, s);
            assert_eq!(
                String::from_utf8(out).expect("UTF-8"),
                serde_json::to_string(s).expect("JSON"),
                "{s:?}"
            );
        }
    }

    #[test]
    fn an_object_is_serde_jsons_text_for_the_same_members() {
        let callers: Map<String, Value> =
            [("b".to_string(), json!("theirs"))].into_iter().collect();
        let mut out = Vec::new();
        let mut o = Object::with_callers(&mut out, Some(&callers));
        o.text("a", "ours");
        o.text("b", "skipped: the caller gives b");
        o.string("c", "x\"y");
        o.raw("d", "null");
        o.value("e", &[1.5, 2.0]);
        let mut inner = o.object("f");
        inner.value("g", &Some(3));
        inner.close();
        o.joined("h", &["/p/", "i\"d"]);
        o.joined("i", &["/p/", "id"]);
        o.any("b", &callers["b"]);
        o.any("odd \"key\"", &json!(true));
        fixed!(&mut o, "x" => "1", "b" => "null", "y" => "{}");
        o.close();
        assert_eq!(
            String::from_utf8(out).expect("UTF-8"),
            r#"{"a":"ours","c":"x\"y","d":null,"e":[1.5,2.0],"f":{"g":3},"h":"/p/i\"d","i":"/p/id","b":"theirs","odd \"key\"":true,"x":1,"y":{}}"#
        );
    }
}
