//! Reading a config file: YAML, `${VAR}` expansion, the other system's
//! keys that have no effect taken out (with a warning each), then every
//! unknown key, wrong type and invalid value listed at once with its YAML
//! path.

use super::*;

/// Reads, expands and validates the file at `path`.
pub fn load(path: &str) -> Result<Config, Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("{path}: cannot read config: {e}")])?;
    parse(&text, &|name| std::env::var(name).ok())
}

/// The other system's keys in the file at `path` that have no effect here
/// (what [`load`] warns about), read again for a file that did not load:
/// a user fixing the errors sees them at once too. Nothing when the file
/// cannot be read or is not YAML (the errors say so).
pub fn no_effect_warnings(path: &str) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    match serde_yaml::from_str::<serde_yaml::Value>(&text) {
        Ok(mut tree) => compat::strip_no_effect_keys(&mut tree),
        Err(_) => Vec::new(),
    }
}

/// Parses config text with `env` supplying `${VAR}` values.
pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, Vec<String>> {
    let mut tree: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| vec![format!("invalid YAML: {e}")])?;
    let mut errors = Vec::new();
    expand::expand_tree(&mut tree, &mut String::new(), env, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut no_effect = compat::strip_no_effect_keys(&mut tree);
    no_effect.extend(compat::move_legacy_authorization(&mut tree)?);
    let mut config = deserialize_all(tree)?;
    config.warnings.splice(0..0, no_effect);
    Ok(config)
}

/// Most schema problems listed from one file.
const MAX_SCHEMA_PROBLEMS: usize = 100;

/// Deserializes and validates, listing every problem at once: each unknown
/// key or wrongly typed value is recorded with its YAML path and taken out
/// of the tree, and the rest is read again, so a user fixes a file in one
/// pass rather than one line per run. The checks of values
/// (`validate`) run on what remains, and their problems join the list.
fn deserialize_all(mut tree: serde_yaml::Value) -> Result<Config, Vec<String>> {
    let mut errors: Vec<String> = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    loop {
        match serde_path_to_error::deserialize::<_, RawConfig>(tree.clone()) {
            Ok(raw) => {
                let checked = validate::validate(raw);
                return match (checked, errors.is_empty()) {
                    (Ok(config), true) => Ok(config),
                    (Ok(_), false) => Err(errors),
                    (Err(more), _) => {
                        // Not about a key already reported and taken out.
                        errors.extend(
                            more.into_iter().filter(|m| {
                                !removed.iter().any(|r| m.starts_with(&format!("{r}:")))
                            }),
                        );
                        Err(errors)
                    }
                };
            }
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.into_inner().to_string();
                // A required key reported wrong and taken out now reads as
                // missing: said once already.
                let echo = inner
                    .strip_prefix("missing field `")
                    .and_then(|f| f.split('`').next())
                    .map(|f| {
                        if path == "." {
                            f.to_string()
                        } else {
                            format!("{path}.{f}")
                        }
                    })
                    .is_some_and(|p| removed.contains(&p));
                if !echo {
                    errors.push(if path == "." {
                        inner
                    } else {
                        format!("{path}: {inner}")
                    });
                }
                if echo
                    || path == "."
                    || errors.len() >= MAX_SCHEMA_PROBLEMS
                    || !remove_path(&mut tree, &path)
                {
                    return Err(errors);
                }
                removed.push(path);
            }
        }
    }
}

/// Removes the node at a `serde_path_to_error` path (`a.b[2].c`) from
/// `tree`; whether there was one.
fn remove_path(tree: &mut serde_yaml::Value, path: &str) -> bool {
    let mut steps: Vec<Result<usize, String>> = Vec::new();
    for part in path.split('.') {
        let (key, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            steps.push(Err(key.to_string()));
        }
        for idx in indexes.split('[').filter(|s| !s.is_empty()) {
            match idx.trim_end_matches(']').parse::<usize>() {
                Ok(n) => steps.push(Ok(n)),
                Err(_) => return false,
            }
        }
    }
    let Some((last, walk)) = steps.split_last() else {
        return false;
    };
    let mut node = tree;
    for step in walk {
        let next = match step {
            Ok(i) => node.as_sequence_mut().and_then(|s| s.get_mut(*i)),
            Err(k) => node.as_mapping_mut().and_then(|m| m.get_mut(k.as_str())),
        };
        match next {
            Some(n) => node = n,
            None => return false,
        }
    }
    match last {
        Ok(i) => match node.as_sequence_mut() {
            Some(s) if *i < s.len() => {
                s.remove(*i);
                true
            }
            _ => false,
        },
        Err(k) => node
            .as_mapping_mut()
            .is_some_and(|m| m.remove(k.as_str()).is_some()),
    }
}
