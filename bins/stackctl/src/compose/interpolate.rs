//! Compose's variable substitution in values: `$VAR`, `${VAR}`,
//! `${VAR:-default}` (unset or empty), `${VAR-default}` (unset),
//! `${VAR:?message}` / `${VAR?message}` (required), `$$` for a literal `$`.

use std::collections::BTreeMap;

/// Why a value could not be interpolated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterpolateError {
    /// `${VAR:?msg}` with VAR unset (or empty): the variable and the message.
    Required { var: String, message: String },
    /// A `${` without its `}` or an invalid name.
    Syntax { detail: String },
}

/// Substitutes the variables of `input` from `env`.
pub fn interpolate(
    input: &str,
    env: &BTreeMap<String, String>,
) -> Result<String, InterpolateError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = matching_brace(r).ok_or_else(|| InterpolateError::Syntax {
                detail: format!("`${{` without `}}` in {input:?}"),
            })?;
            out.push_str(&braced(&r[..end], env, input)?);
            rest = &r[end + 1..];
        } else {
            let len = rest
                .char_indices()
                .find(|&(i, c)| {
                    !(c == '_' || c.is_ascii_alphanumeric()) || (i == 0 && c.is_ascii_digit())
                })
                .map_or(rest.len(), |(i, _)| i);
            if len == 0 {
                // A lone `$` (e.g. at the end) stays as it is, as in Compose v1.
                out.push('$');
            } else {
                out.push_str(env.get(&rest[..len]).map_or("", String::as_str));
                rest = &rest[len..];
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The index of the `}` closing a `${`, allowing nested `${...}` in defaults.
fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return Some(i),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

fn braced(
    expr: &str,
    env: &BTreeMap<String, String>,
    input: &str,
) -> Result<String, InterpolateError> {
    let name_len = expr
        .find(|c: char| !(c == '_' || c.is_ascii_alphanumeric()))
        .unwrap_or(expr.len());
    let (name, op) = expr.split_at(name_len);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(InterpolateError::Syntax {
            detail: format!("invalid variable name in `${{{expr}}}` ({input:?})"),
        });
    }
    let value = env.get(name);
    let set_nonempty = value.is_some_and(|v| !v.is_empty());
    let nested = |s: &str| interpolate(s, env);
    Ok(match op {
        "" => value.cloned().unwrap_or_default(),
        _ if op.starts_with(":-") => {
            if set_nonempty {
                value.cloned().unwrap_or_default()
            } else {
                nested(&op[2..])?
            }
        }
        _ if op.starts_with('-') => match value {
            Some(v) => v.clone(),
            None => nested(&op[1..])?,
        },
        _ if op.starts_with(":?") || op.starts_with('?') => {
            let (ok, message) = if let Some(m) = op.strip_prefix(":?") {
                (set_nonempty, m)
            } else {
                (value.is_some(), &op[1..])
            };
            if !ok {
                return Err(InterpolateError::Required {
                    var: name.to_owned(),
                    message: if message.is_empty() {
                        "required variable is not set".to_owned()
                    } else {
                        nested(message)?
                    },
                });
            }
            value.cloned().unwrap_or_default()
        }
        _ => {
            return Err(InterpolateError::Syntax {
                detail: format!("unsupported substitution `${{{expr}}}` in {input:?}"),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn substitutes_every_form() {
        let e = env(&[("A", "x"), ("EMPTY", "")]);
        let i = |s: &str| interpolate(s, &e).expect(s);
        assert_eq!(i("$A-${A}"), "x-x");
        assert_eq!(i("${B:-def}"), "def");
        assert_eq!(i("${EMPTY:-def}"), "def");
        assert_eq!(i("${EMPTY-def}"), "");
        assert_eq!(i("${B-def}"), "def");
        assert_eq!(i("${A:-def}"), "x");
        assert_eq!(i("${B}"), "");
        assert_eq!(i("$$A costs $$5"), "$A costs $5");
        assert_eq!(i("${B:-${A}/secrets}"), "x/secrets");
        assert_eq!(
            i("${WEB_BIND:-127.0.0.1}:${WEB_PORT:-8000}:8000"),
            "127.0.0.1:8000:8000"
        );
        assert_eq!(i("no vars"), "no vars");
        assert_eq!(i("trailing $"), "trailing $");
        assert_eq!(i("${A:?set it}"), "x");
    }

    #[test]
    fn required_variables_fail_with_their_message() {
        let e = env(&[("EMPTY", "")]);
        assert_eq!(
            interpolate("${TOKEN:?run init-secrets}", &e),
            Err(InterpolateError::Required {
                var: "TOKEN".into(),
                message: "run init-secrets".into()
            })
        );
        assert!(matches!(
            interpolate("${EMPTY:?}", &e),
            Err(InterpolateError::Required { .. })
        ));
        assert_eq!(interpolate("${EMPTY?}", &e), Ok(String::new()));
        assert!(matches!(
            interpolate("${OPEN", &e),
            Err(InterpolateError::Syntax { .. })
        ));
        assert!(matches!(
            interpolate("${A/x/y}", &e),
            Err(InterpolateError::Syntax { .. })
        ));
    }
}
