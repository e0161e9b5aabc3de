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

/// Whether the setting read from `variable` may instead come from the file named by
/// `<VARIABLE>_FILE` (Docker-secrets style): every URL (`AMQP_URL`, `DATABASE_URL`,
/// `MONGODB_URL`, a new writer's own), since URLs carry passwords, which a variable would show
/// to anyone who can read the process's environment.
pub fn from_file_allowed(variable: &str) -> bool {
    variable.ends_with("_URL")
}

/// Parses flags and environment (with URLs read from their `_FILE`, [`from_file_allowed`]), then
/// validates. On bad configuration prints one line to stderr and returns the exit code to use
/// (2); `--help` and `--version` print and return 0.
pub fn parse<T: Parser + Validate>() -> Result<T, ExitCode> {
    let args = std::env::args_os().collect();
    match with_secret_files::<T>(args, |name| std::env::var(name).ok()) {
        Ok(args) => parse_from(args),
        Err(line) => {
            eprintln!("error: invalid configuration: {line}");
            Err(ExitCode::from(EXIT_BAD_CONFIG))
        }
    }
}

/// `args` plus `--flag=value` for each setting of `T` that [`from_file_allowed`] and whose `_FILE`
/// variable names a file (its content, trimmed, is the value).
pub fn with_secret_files<T: clap::CommandFactory>(
    mut args: Vec<std::ffi::OsString>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Vec<std::ffi::OsString>, String> {
    let command = T::command();
    for arg in command.get_arguments() {
        let (Some(variable), Some(long)) = (arg.get_env().and_then(|e| e.to_str()), arg.get_long())
        else {
            continue;
        };
        if !from_file_allowed(variable) {
            continue;
        }
        let file_variable = format!("{variable}_FILE");
        let Some(path) = env(&file_variable) else {
            continue;
        };
        if env(variable).is_some() {
            return Err(format!("{variable} and {file_variable}: set one, not both"));
        }
        let value = std::fs::read_to_string(&path)
            .map_err(|e| format!("{file_variable}: cannot read {path}: {e}"))?;
        args.push(format!("--{long}={}", value.trim()).into());
    }
    Ok(args)
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

/// Checks that the URL in `setting` (e.g. `--database-url (DATABASE_URL)`) starts with one of
/// `schemes` (`postgres://`, …).
pub fn require_scheme(setting: &str, url: &str, schemes: &[&str]) -> Result<(), String> {
    if schemes.iter().any(|scheme| url.starts_with(scheme)) {
        Ok(())
    } else {
        Err(format!(
            "{setting}: must start with {}",
            schemes.join(" or ")
        ))
    }
}

/// A secret (token, password) that never prints: `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// `expose` (the value, for the one place that must use it) and parsing from a setting, for a
/// string type that keeps its value from printing.
macro_rules! unprinted {
    ($name:ident) => {
        impl $name {
            /// The value itself, for the one place that must use it.
            pub fn expose(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = std::convert::Infallible;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Ok(Self(s.to_owned()))
            }
        }
    };
}

unprinted!(Secret);

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

/// A URL that may carry a password: `Debug` and `Display` show it redacted
/// ([`redact_url`](crate::telemetry::redact_url)), so printing a configuration never leaks it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

unprinted!(SecretUrl);

impl From<&str> for SecretUrl {
    fn from(url: &str) -> Self {
        Self(url.to_owned())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", crate::telemetry::redact_url(&self.0))
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::telemetry::redact_url(&self.0))
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

/// Parses an interval like [`parse_duration`], where a bare `0` means "never".
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        Ok(Duration::ZERO)
    } else {
        parse_duration(text)
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

    #[derive(Debug, Parser)]
    struct Urls {
        #[arg(long, env = "AMQP_URL", default_value = "amqp://default")]
        amqp_url: String,
        #[arg(long, env = "LOG_FORMAT", default_value = "json")]
        log_format: String,
    }

    #[test]
    fn a_url_can_come_from_the_file_its_file_variable_names() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("amqp-url");
        std::fs::write(&path, "amqp://user:pa%2Fss@host/\n").expect("write");
        let path = path.display().to_string();
        let env = |name: &str| (name == "AMQP_URL_FILE").then(|| path.clone());
        let args = with_secret_files::<Urls>(vec!["svc".into()], env).expect("read");
        let urls = Urls::try_parse_from(args).expect("parses");
        assert_eq!(urls.amqp_url, "amqp://user:pa%2Fss@host/");
        assert_eq!(urls.log_format, "json");
        // Both set is an error; other variables' _FILE are not secrets and are ignored.
        let both = |name: &str| match name {
            "AMQP_URL_FILE" => Some(path.clone()),
            "AMQP_URL" => Some("amqp://x".into()),
            "LOG_FORMAT_FILE" => Some("/nonexistent".into()),
            _ => None,
        };
        assert!(with_secret_files::<Urls>(vec!["svc".into()], both).is_err());
        let missing =
            |name: &str| (name == "AMQP_URL_FILE").then(|| "/nonexistent/file".to_owned());
        assert!(
            with_secret_files::<Urls>(vec!["svc".into()], missing)
                .is_err_and(|e| e.contains("cannot read"))
        );
    }

    #[test]
    fn urls_print_without_their_password() {
        let url: SecretUrl = "amqp://guest:hunter2@h:5672/%2f"
            .parse()
            .expect("infallible");
        assert!(!format!("{url} {url:?}").contains("hunter2"));
        assert_eq!(url.expose(), "amqp://guest:hunter2@h:5672/%2f");
    }

    #[test]
    fn secrets_never_print() {
        let secret: Secret = "hunter2".parse().expect("infallible");
        assert_eq!(format!("{secret} {secret:?}"), "*** Secret(***)");
        assert_eq!(secret.expose(), "hunter2");
    }
}
