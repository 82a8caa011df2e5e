//! Where a model or tokenizer `source` lives on disk: a local directory, or a hub id found in the
//! standard Hugging Face cache. Never the network: runs must not depend on a hub being reachable.

use std::path::{Path, PathBuf};

use super::error::ConfigError;

/// Resolves a `model.source` / `tokenizer.source` to a directory, reading the cache location from
/// the process environment. See [`resolve_source_with_env`].
pub fn resolve_source(source: &str) -> Result<PathBuf, ConfigError> {
    let env: Vec<(String, String)> = ["HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HOME", "USERPROFILE"]
        .iter()
        .filter_map(|name| Some((name.to_string(), std::env::var(name).ok()?)))
        .collect();
    resolve_source_with_env(source, &env)
}

/// Resolves `source` with the environment given as `(name, value)` pairs:
///
/// 1. an existing directory (relative to the working directory) is used as is;
/// 2. a hub id (`org/name` or `name`) is looked up in the Hugging Face cache: `$HF_HUB_CACHE`,
///    else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
///    `~/.cache/huggingface/hub`. There `models--org--name/refs/main` holds the commit whose
///    files are in `snapshots/<commit>/`; without `refs/main`, the only (or newest) snapshot.
pub fn resolve_source_with_env(source: &str, env: &[(String, String)]) -> Result<PathBuf, ConfigError> {
    let local = Path::new(source);
    // A directory, or a causal LM's single GGUF file.
    if local.is_dir() || (local.is_file() && local.extension().is_some_and(|e| e == "gguf")) {
        return Ok(local.to_owned());
    }
    let mut tried = vec![format!("{} (no such directory)", local.display())];
    let not_found = |tried, help: String| ConfigError::SourceNotFound {
        requested: source.to_owned(),
        tried,
        help: format!("pipe never downloads models. {help}"),
    };
    let local_help = format!(
        "Put the model's files (config.json, model.safetensors, tokenizer.json) in a directory \
         and set `source` to it, e.g. `models/{}`",
        source.rsplit('/').next().unwrap_or(source)
    );
    if !is_hub_id(source) {
        return Err(not_found(tried, local_help));
    }
    let Some((cache, from)) = hub_cache_dir(env) else {
        tried.push("the Hugging Face cache (HF_HUB_CACHE, HF_HOME and HOME are all unset)".into());
        return Err(not_found(tried, local_help));
    };
    let repo = cache.join(format!("models--{}", source.replace('/', "--")));
    match snapshot(&repo) {
        Ok(dir) => Ok(dir),
        Err(why) => {
            tried.push(format!("{} ({why}; cache from {from})", repo.display()));
            Err(not_found(
                tried,
                format!(
                    "{local_help}; or pre-populate the cache at {} on a machine with network \
                     (`hf download {source}`) and copy it here",
                    cache.display()
                ),
            ))
        }
    }
}

/// `org/name` or `name`, with the characters the hub allows.
fn is_hub_id(source: &str) -> bool {
    let parts: Vec<&str> = source.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|part| {
            !part.is_empty()
                && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !part.starts_with(['-', '.'])
                && !part.ends_with(['-', '.'])
                && !part.contains("--")
                && !part.contains("..")
        })
}

/// The hub cache directory and the variable it came from, as `huggingface_hub` chooses it.
fn hub_cache_dir(env: &[(String, String)]) -> Option<(PathBuf, &'static str)> {
    let var =
        |name: &str| env.iter().find(|(k, v)| k == name && !v.is_empty()).map(|(_, v)| PathBuf::from(v));
    if let Some(dir) = var("HF_HUB_CACHE") {
        return Some((dir, "HF_HUB_CACHE"));
    }
    if let Some(home) = var("HF_HOME") {
        return Some((home.join("hub"), "HF_HOME"));
    }
    if let Some(cache) = var("XDG_CACHE_HOME") {
        return Some((cache.join("huggingface").join("hub"), "XDG_CACHE_HOME"));
    }
    let home = var("HOME").or_else(|| var("USERPROFILE"))?;
    Some((home.join(".cache").join("huggingface").join("hub"), "the home directory"))
}

/// The snapshot directory of a cached repo, or why there is none.
fn snapshot(repo: &Path) -> Result<PathBuf, String> {
    if !repo.is_dir() {
        return Err("not in the cache".into());
    }
    let snapshots = repo.join("snapshots");
    match std::fs::read_to_string(repo.join("refs").join("main")) {
        Ok(commit) => {
            let dir = snapshots.join(commit.trim());
            match dir.is_dir() {
                true => Ok(dir),
                false => Err(format!("refs/main names snapshot {} but it is missing", commit.trim())),
            }
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => newest_snapshot(&snapshots),
        Err(err) => Err(format!("cannot read refs/main: {err}")),
    }
}

fn newest_snapshot(snapshots: &Path) -> Result<PathBuf, String> {
    let entries = std::fs::read_dir(snapshots).map_err(|err| format!("cannot list snapshots/: {err}"))?;
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|err| format!("cannot list snapshots/: {err}"))?;
        let path = entry.path();
        if path.is_dir() {
            let modified = entry.metadata().and_then(|m| m.modified()).ok();
            dirs.push((modified, path));
        }
    }
    // Newest first; the name breaks ties so that the choice never depends on listing order.
    dirs.sort();
    dirs.pop().map(|(_, path)| path).ok_or_else(|| "no snapshots and no refs/main".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cache: &Path) -> Vec<(String, String)> {
        vec![("HF_HUB_CACHE".into(), cache.display().to_string())]
    }

    #[test]
    fn local_directory_wins() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().display().to_string();
        assert_eq!(resolve_source_with_env(&source, &[]).unwrap(), dir.path());
    }

    #[test]
    fn hub_id_resolves_through_refs_main() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--tiny-bert");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/old999")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let dir = resolve_source_with_env("org/tiny-bert", &env(cache.path())).unwrap();
        assert_eq!(dir, repo.join("snapshots/abc123"));
    }

    #[test]
    fn hub_id_without_refs_uses_the_only_snapshot() {
        let home = tempfile::tempdir().unwrap();
        let repo = home.path().join(".cache/huggingface/hub/models--bert-tiny");
        std::fs::create_dir_all(repo.join("snapshots/f00d")).unwrap();
        let env = vec![("HOME".to_owned(), home.path().display().to_string())];
        assert_eq!(resolve_source_with_env("bert-tiny", &env).unwrap(), repo.join("snapshots/f00d"));
    }

    #[test]
    fn hf_home_is_used_when_hub_cache_is_unset() {
        let home = tempfile::tempdir().unwrap();
        let repo = home.path().join("hub/models--org--m");
        std::fs::create_dir_all(repo.join("snapshots/1")).unwrap();
        let env = vec![("HF_HOME".to_owned(), home.path().display().to_string())];
        assert_eq!(resolve_source_with_env("org/m", &env).unwrap(), repo.join("snapshots/1"));
    }

    #[test]
    fn missing_model_says_what_was_tried_and_how_to_fix() {
        let cache = tempfile::tempdir().unwrap();
        let err = resolve_source_with_env("org/absent-model", &env(cache.path())).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("`org/absent-model`"), "{text}");
        assert!(text.contains("models--org--absent-model"), "{text}");
        assert!(text.contains("HF_HUB_CACHE"), "{text}");
        assert!(text.contains("pre-populate the cache"), "{text}");
    }

    #[test]
    fn dangling_refs_main_is_reported() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--m");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "deadbeef").unwrap();
        let text = resolve_source_with_env("org/m", &env(cache.path())).unwrap_err().to_string();
        assert!(text.contains("refs/main names snapshot deadbeef"), "{text}");
    }

    #[test]
    fn paths_are_not_hub_ids() {
        assert!(is_hub_id("sentence-transformers/all-MiniLM-L6-v2"));
        assert!(is_hub_id("bert-base-uncased"));
        for path in ["./models/x", "/abs/x", "a/b/c", "../x", "a--b/c", ""] {
            assert!(!is_hub_id(path), "{path}");
        }
    }
}
