//! Configuration conventions shared by every service: clap flags that each have an environment
//! variable, validation before anything connects, and exit code 2 with one clear line on bad
//! configuration.

use std::fmt;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Exit code for bad configuration.
pub const EXIT_BAD_CONFIG: u8 = 2;

/// A configuration a service checks beyond what clap can express.
pub trait Validate {
    /// Returns one line naming the setting at fault, e.g. `--rate (RATE): must be positive`.
    fn validate(&self) -> Result<(), String>;
}

/// Parses flags and environment, then validates. On bad configuration prints one line to
/// stderr and returns the exit code to use (2); `--help` and `--version` print and return 0.
pub fn parse<T: Parser + Validate>() -> Result<T, ExitCode> {
    parse_from(std::env::args_os())
}

/// [`parse`] over explicit arguments (for tests).
pub fn parse_from<T, I, A>(args: I) -> Result<T, ExitCode>
where
    T: Parser + Validate,
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString> + Clone,
{
    match T::try_parse_from(args) {
        Ok(config) => match config.validate() {
            Ok(()) => Ok(config),
            Err(line) => {
                eprintln!("error: invalid configuration: {line}");
                Err(ExitCode::from(EXIT_BAD_CONFIG))
            }
        },
        Err(err) if !err.use_stderr() => {
            let _ = err.print();
            Err(ExitCode::SUCCESS)
        }
        Err(err) => {
            let rendered = err.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid configuration");
            eprintln!("{first}");
            Err(ExitCode::from(EXIT_BAD_CONFIG))
        }
    }
}

/// A secret (token, password) that never prints: `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret's value, for the one place that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Parses a duration written as `250ms`, `5s`, `2m` or `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit (use ms, s, m or h)"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(Duration::from_secs(number)),
        "m" => Ok(Duration::from_secs(number * 60)),
        "h" => Ok(Duration::from_secs(number * 3600)),
        _ => Err(format!("{text:?} has an unknown unit (use ms, s, m or h)")),
    }
}

/// Parses a byte size written as `512`, `64KiB`, `1MiB` or `2GiB`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let factor = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit (use B, KiB, MiB or GiB)"
            ));
        }
    };
    Ok(number * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse_with_their_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("512"), Ok(512));
        assert!(parse_bytes("1MB").is_err());
    }

    #[test]
    fn secrets_never_print() {
        let secret: Secret = "hunter2".parse().expect("infallible");
        assert_eq!(format!("{secret} {secret:?}"), "*** Secret(***)");
        assert_eq!(secret.expose(), "hunter2");
    }
}
