//! Configuration errors that say where the bad input came from and show it, as rustc does.
//!
//! A located error renders as
//!
//! ```text
//! pipelines/bert.toml:12:1: unknown key `epoch` in [train]; did you mean `epochs`?
//!    |
//! 12 | epoch = 3
//!    | ^^^^^
//!    = help: valid keys in [train]: epochs, batch_size, ...
//! ```
//!
//! and the CLI prints it after `error: `. The first line leads with `file:line:column` (or the
//! environment variable, or the `--set` argument) so editors and terminals can jump to it.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Everything that can go wrong while loading a pipeline. `Display` is the complete message for
/// the user; the CLI maps every variant to exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The pipeline file named on the command line could not be read.
    #[error("cannot read pipeline file `{}`: {source}", path.display())]
    Read {
        /// The path as given.
        path: PathBuf,
        /// Why reading failed.
        source: io::Error,
    },
    /// Bad input in one of the layers: a syntax error, an unknown key, a wrong type, an invalid
    /// value, an unreadable or cyclic `extends`.
    #[error("{}", render(.origin, .message, .help.as_deref()))]
    Invalid {
        /// Where the offending key or value came from.
        origin: Origin,
        /// What is wrong, in one line.
        message: String,
        /// What is expected, or how to fix it.
        help: Option<String>,
    },
    /// A model or tokenizer `source` is neither a local directory nor in the Hugging Face cache.
    #[error("{}", render_not_found(.requested, .tried, .help))]
    SourceNotFound {
        /// The `source` value as written.
        requested: String,
        /// One line per place that was looked at, saying what was found there.
        tried: Vec<String>,
        /// How to make the model available without network.
        help: String,
    },
}

impl ConfigError {
    /// Where the error points, if it comes from a configuration layer.
    pub fn origin(&self) -> Option<&Origin> {
        match self {
            ConfigError::Invalid { origin, .. } => Some(origin),
            _ => None,
        }
    }

    /// The file the error is about, if any.
    pub fn file(&self) -> Option<&Path> {
        match self {
            ConfigError::Read { path, .. } => Some(path),
            ConfigError::Invalid { origin: Origin::File { path, .. }, .. } => Some(path),
            _ => None,
        }
    }

    /// 1-based line and column in [`ConfigError::file`], when known.
    pub fn line_column(&self) -> Option<(usize, usize)> {
        match self.origin()? {
            Origin::File { snippet: Some(snippet), .. } => Some((snippet.line, snippet.column)),
            _ => None,
        }
    }
}

/// The layer a key or value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A pipeline file; `snippet` marks the key or value when the position is known.
    File {
        /// The file's path, as given or as reached through `extends`.
        path: PathBuf,
        /// The line with the offending text marked.
        snippet: Option<Snippet>,
    },
    /// A `PIPE_*` environment variable.
    Env {
        /// Variable name.
        var: String,
        /// Its value.
        value: String,
    },
    /// A `--set key=value` override, as given.
    Set {
        /// The whole argument.
        arg: String,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, snippet: Some(s) } => {
                write!(f, "{}:{}:{}", path.display(), s.line, s.column)
            }
            Origin::File { path, snippet: None } => write!(f, "{}", path.display()),
            Origin::Env { var, value } => write!(f, "environment variable {var}={value}"),
            Origin::Set { arg } => write!(f, "--set {arg}"),
        }
    }
}

/// One source line with a marked range, for caret display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snippet {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// The whole line, without its line ending.
    pub text: String,
    /// How many characters to underline (at least one).
    pub width: usize,
}

impl Snippet {
    /// The snippet for the byte range `span` of `source`; a span that runs over several lines is
    /// cut at the end of its first line.
    pub(crate) fn new(source: &str, span: Range<usize>) -> Self {
        let mut start = span.start.min(source.len());
        while !source.is_char_boundary(start) {
            start -= 1;
        }
        let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = source[start..].find('\n').map_or(source.len(), |i| start + i);
        let mut end = span.end.clamp(start, line_end);
        while !source.is_char_boundary(end) {
            end -= 1;
        }
        Snippet {
            line: source[..start].matches('\n').count() + 1,
            column: source[line_start..start].chars().count() + 1,
            text: source[line_start..line_end].trim_end_matches('\r').to_owned(),
            width: source[start..end].trim_end_matches('\r').chars().count().max(1),
        }
    }
}

fn render(origin: &Origin, message: &str, help: Option<&str>) -> String {
    let mut out = format!("{origin}: {message}");
    let snippet = match origin {
        Origin::File { snippet: Some(snippet), .. } => Some(snippet),
        _ => None,
    };
    let gutter = snippet.map_or(1, |s| s.line.to_string().len());
    let pad = " ".repeat(gutter);
    if let Some(s) = snippet {
        // Keep tabs in the caret line so the carets stay under the text whatever the tab width.
        let indent: String =
            s.text.chars().take(s.column - 1).map(|c| if c == '\t' { '\t' } else { ' ' }).collect();
        out.push_str(&format!("\n{pad} |\n{} | {}\n{pad} | {indent}{}", s.line, s.text, "^".repeat(s.width)));
    }
    if let Some(help) = help {
        out.push_str(&format!("\n{pad} = help: {help}"));
    }
    out
}

fn render_not_found(requested: &str, tried: &[String], help: &str) -> String {
    let mut out = format!(
        "cannot find source `{requested}`: it is not a local directory and not in the Hugging Face cache"
    );
    for line in tried {
        out.push_str(&format!("\n  tried: {line}"));
    }
    out.push_str(&format!("\n  = help: {help}"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippet_finds_line_and_column_in_characters() {
        let source = "a = 1\n[train]\népoque = 3\n";
        let start = source.find('3').unwrap();
        let s = Snippet::new(source, start..start + 1);
        assert_eq!((s.line, s.column, s.width), (3, 10, 1));
        assert_eq!(s.text, "époque = 3");
    }

    #[test]
    fn render_puts_the_caret_under_the_span() {
        let source = "[train]\nepochs = \"three\"\n";
        let start = source.find('"').unwrap();
        let origin = Origin::File {
            path: PathBuf::from("p.toml"),
            snippet: Some(Snippet::new(source, start..start + 7)),
        };
        let text = render(&origin, "wrong", Some("fix it"));
        assert_eq!(
            text,
            "p.toml:2:10: wrong\n  |\n2 | epochs = \"three\"\n  |          ^^^^^^^\n  = help: fix it"
        );
    }
}
