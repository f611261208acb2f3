//! The one parser of the durations users write: `250ms`, `5s`, `1m`, `1h`, or a bare number of
//! seconds (decimals allowed). Settings, the command line and the tools all use it.

use std::time::Duration;

use thiserror::Error;

use crate::quote::quote;

/// A duration was written in a way [`parse_duration`] does not accept.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvalidDuration {
    /// No number, or not a number.
    #[error("{} is not a duration: write it like 500ms, 5s or 1m", quote(.0))]
    NotADuration(String),
    /// A number followed by something other than `ms`, `s`, `m` or `h`.
    #[error("unknown unit {} in {}: use ms, s, m or h", quote(.unit), quote(.text))]
    UnknownUnit {
        /// The unit as written.
        unit: String,
        /// The whole text.
        text: String,
    },
    /// Shorter than a millisecond (zero included).
    #[error("{} must be at least 1ms", quote(.0))]
    TooShort(String),
    /// More than a `Duration` holds.
    #[error("{} is too long a duration", quote(.0))]
    TooLong(String),
}

/// Parses durations written `250ms`, `5s`, `1m`, `1h` (a bare number is seconds). Zero and
/// negative values are refused: every duration here is a wait or an interval.
///
/// ```
/// use std::time::Duration;
/// use orchestrator_core::parse_duration;
/// assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
/// assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
/// assert!(parse_duration("0s").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, InvalidDuration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| InvalidDuration::NotADuration(text.to_owned()))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(InvalidDuration::UnknownUnit {
                unit: other.to_owned(),
                text: text.to_owned(),
            });
        }
    };
    let duration = Duration::try_from_secs_f64(seconds)
        .map_err(|_| InvalidDuration::TooLong(text.to_owned()))?;
    if duration < Duration::from_millis(1) {
        return Err(InvalidDuration::TooShort(text.to_owned()));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_the_seed_writes_them() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration(" 500ms "), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0.25s"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn bad_durations_say_why_in_one_line() {
        let message = |text: &str| parse_duration(text).unwrap_err().to_string();
        assert_eq!(message("0s"), "\"0s\" must be at least 1ms");
        assert_eq!(message("-5s"), "\"-5s\" is not a duration: write it like 500ms, 5s or 1m");
        assert_eq!(message(""), "\"\" is not a duration: write it like 500ms, 5s or 1m");
        assert_eq!(
            message("1.2.3s"),
            "\"1.2.3s\" is not a duration: write it like 500ms, 5s or 1m"
        );
        assert_eq!(
            message("5 parsecs"),
            "unknown unit \"parsecs\" in \"5 parsecs\": use ms, s, m or h"
        );
        assert_eq!(
            message(&"9".repeat(400)),
            format!("{:?}… (400 characters) is too long a duration", "9".repeat(40))
        );
        assert!(!message(&format!("5{}", "x".repeat(5000))).contains(&"x".repeat(41)));
    }
}
