//! `${VAR}` expansion in configuration values.
//!
//! Expansion runs on the parsed YAML tree, so comments are never touched and a
//! variable's value can never change the document's structure. `${VAR:-default}`
//! supplies a fallback; `$$` is a literal `$`. Every missing variable is reported
//! with the YAML path of the value that referenced it.

use serde_yaml::Value;

/// Expands every string scalar in `value`, collecting one error per missing variable.
pub fn expand_tree(
    value: &mut Value,
    path: &mut String,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<String>,
) {
    match value {
        Value::String(s) if s.contains('$') => match expand_str(s, env) {
            Ok(out) => *s = out,
            Err(e) => errors.push(format!("{}: {}", display_path(path), e)),
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_tree(item, path, env, errors);
                path.truncate(len);
            }
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                match k {
                    Value::String(k) => path.push_str(k),
                    other => path.push_str(&format!("{other:?}")),
                }
                expand_tree(v, path, env, errors);
                path.truncate(len);
            }
        }
        Value::Tagged(t) => expand_tree(&mut t.value, path, env, errors),
        _ => {}
    }
}

fn display_path(path: &str) -> &str {
    if path.is_empty() {
        "(top level)"
    } else {
        path
    }
}

/// Expands `${VAR}`, `${VAR:-default}` and `$$` in one string.
pub fn expand_str(input: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unterminated `${{` in {input:?}"))?;
            let spec = &body[..end];
            let (name, default) = match spec.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (spec, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid variable name {name:?} in {input:?}"));
            }
            match env(name) {
                Some(v) => out.push_str(&v),
                None => match default {
                    Some(d) => out.push_str(d),
                    None => return Err(format!("environment variable {name} is not set")),
                },
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "A" => Some("alpha".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_known_and_defaults() {
        assert_eq!(expand_str("x-${A}-y", &env).unwrap(), "x-alpha-y");
        assert_eq!(expand_str("${B:-fallback}", &env).unwrap(), "fallback");
        assert_eq!(expand_str("cost $$5", &env).unwrap(), "cost $5");
        assert_eq!(expand_str("plain $ sign", &env).unwrap(), "plain $ sign");
    }

    #[test]
    fn missing_variable_is_named() {
        let err = expand_str("${NOPE}", &env).unwrap_err();
        assert!(err.contains("NOPE"), "{err}");
        assert!(expand_str("${A", &env).is_err());
        assert!(expand_str("${A B}", &env).is_err());
    }

    #[test]
    fn tree_errors_carry_paths() {
        let mut v: Value =
            serde_yaml::from_str("a:\n  b: [x, '${NOPE}']\n# ${IN_COMMENT}\n").unwrap();
        let mut errors = Vec::new();
        expand_tree(&mut v, &mut String::new(), &env, &mut errors);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("a.b[1]:"), "{}", errors[0]);
    }
}
