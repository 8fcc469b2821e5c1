//! The `.env` file beside the compose file, read like Compose v1: one
//! `KEY=value` per line, `#` comments and blank lines skipped, an optional
//! `export ` prefix, values optionally in single or double quotes. Values
//! are taken literally (no substitution).

use std::collections::BTreeMap;

/// The `.env` beside `compose_file`, parsed; empty when there is none or
/// it does not parse (loading the project reports that, naming the line).
pub fn beside(compose_file: &std::path::Path) -> BTreeMap<String, String> {
    compose_file
        .parent()
        .map(|d| d.join(".env"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| parse(&t).ok())
        .unwrap_or_default()
}

/// Parses `.env` text; Err names the line that is not `KEY=value`.
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, (usize, String)> {
    let mut out = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err((i + 1, format!("expected KEY=value, found {raw:?}")));
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c == '_' || c.is_ascii_alphanumeric()) {
            return Err((i + 1, format!("invalid variable name {key:?}")));
        }
        let value = value.trim();
        let value = if value.len() >= 2
            && ((value.starts_with('"') && value.ends_with('"'))
                || (value.starts_with('\'') && value.ends_with('\'')))
        {
            &value[1..value.len() - 1]
        } else {
            value
        };
        out.insert(key.to_owned(), value.to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pairs_comments_quotes_and_export() {
        let env =
            parse("# settings\nA=1\n\nexport B = two \nC=\"x y\"\nD='$E'\nE=\n").expect("valid");
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "two");
        assert_eq!(env["C"], "x y");
        assert_eq!(env["D"], "$E");
        assert_eq!(env["E"], "");
        assert_eq!(
            parse("A=1\noops\n"),
            Err((2, "expected KEY=value, found \"oops\"".into()))
        );
    }
}
