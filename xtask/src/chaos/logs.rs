//! The workers' logs: chaos runs them with `LOG_FORMAT=json`, one JSON object per line, and
//! counts messages by their text.

use std::path::Path;

use serde::Deserialize;

/// The part of a log line chaos reads.
#[derive(Debug, Deserialize)]
struct LogLine {
    #[serde(default)]
    message: String,
    /// The worker a message is about, where it names one.
    #[serde(default)]
    worker_id: Option<String>,
}

/// Lines of the worker logs (`chaos-*.log` in `dir`) whose message starts with `prefix`. Lines
/// that are not JSON objects (a crash's last words) are not counted.
pub(crate) fn count_messages(dir: &Path, prefix: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("chaos-"))
        .map(|e| count_in(&std::fs::read_to_string(e.path()).unwrap_or_default(), prefix))
        .sum()
}

/// How many times the leaders logged `Stale worker cleaned` about worker `id`: a count that
/// grows while a worker is stopped says it was evicted meanwhile.
pub(crate) fn evictions_of(dir: &Path, id: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("chaos-"))
        .map(|e| {
            lines(&std::fs::read_to_string(e.path()).unwrap_or_default())
                .filter(|line| line.message.starts_with("Stale worker cleaned"))
                .filter(|line| line.worker_id.as_deref() == Some(id))
                .count()
        })
        .sum()
}

fn lines(text: &str) -> impl Iterator<Item = LogLine> + '_ {
    text.lines().filter_map(|line| serde_json::from_str::<LogLine>(line).ok())
}

fn count_in(text: &str, prefix: &str) -> usize {
    lines(text).filter(|line| line.message.starts_with(prefix)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_json_lines_by_message() {
        let log = concat!(
            r#"{"timestamp":"2026-11-28T00:03:59.691531Z","level":"WARN","message":"Stale worker cleaned:","worker_id":"chaos-w2","target":"orchestrator_runtime::worker"}"#,
            "\n",
            r#"{"timestamp":"2026-11-28T00:04:00.000000Z","level":"INFO","message":"Generation created:","generation":4}"#,
            "\n",
            "thread 'main' panicked at Stale worker cleaned\n",
            r#"{"level":"WARN","message":"Stale worker cleaned:","worker_id":"chaos-w3"}"#,
            "\n",
        );
        assert_eq!(count_in(log, "Stale worker cleaned"), 2);
        assert_eq!(count_in(log, "Commit fenced"), 0);
        let dir = std::env::temp_dir().join(format!("xtask-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("chaos-w1.log"), log).unwrap();
        std::fs::write(dir.join("append-1.log"), log).unwrap();
        assert_eq!(evictions_of(&dir, "chaos-w2"), 1);
        assert_eq!(evictions_of(&dir, "chaos-w1"), 0);
        assert_eq!(count_messages(&dir, "Generation created"), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
