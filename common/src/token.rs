//! The WebSocket hop's bearer token, rotatable without a restart: a token given as a file is
//! read again on SIGHUP. The filter then accepts the new token and, for a rotation window, the
//! one before it, so generators can be switched over one by one; a generator uses the new one
//! from its next connection on.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::args::TokenArgs;
use crate::config::Secret;

/// The token in force, and the one it replaced while that is still accepted.
#[derive(Debug)]
pub struct Tokens {
    args: TokenArgs,
    window: Duration,
    state: RwLock<State>,
}

#[derive(Debug)]
struct State {
    current: Option<Secret>,
    previous: Option<(Secret, Instant)>,
}

impl Tokens {
    /// The token `args` give (none: no token), with `window` as how long a replaced token is
    /// still accepted. An unusable token is an error naming the setting.
    pub fn new(args: TokenArgs, window: Duration) -> Result<Arc<Self>, String> {
        let current = args.resolve()?;
        Ok(Arc::new(Self {
            args,
            window,
            state: RwLock::new(State {
                current,
                previous: None,
            }),
        }))
    }

    /// The token in force (what a client sends).
    pub fn current(&self) -> Option<Secret> {
        self.read().current.clone()
    }

    /// True when a token is required at all.
    pub fn required(&self) -> bool {
        self.read().current.is_some()
    }

    /// Whether `presented` (the token a client sent) is the token in force, or the one it
    /// replaced within the rotation window. Each comparison takes the same time whatever the
    /// tokens hold. With no token configured, anything is accepted.
    pub fn accepts(&self, presented: &str) -> bool {
        let state = self.read();
        let Some(current) = &state.current else {
            return true;
        };
        let equal = |token: &Secret| {
            bool::from(subtle::ConstantTimeEq::ct_eq(
                presented.as_bytes(),
                token.expose().as_bytes(),
            ))
        };
        let previous = state
            .previous
            .as_ref()
            .is_some_and(|(token, until)| Instant::now() < *until && equal(token));
        equal(current) | previous
    }

    /// Reads the token file again. Ok(true) when the token changed (the old one is accepted
    /// for the rotation window more); a token given as a value, not a file, never changes. An
    /// unreadable or unusable file changes nothing.
    pub fn reload(&self) -> Result<bool, String> {
        if self.args.file.is_none() {
            return Ok(false);
        }
        let fresh = self.args.resolve()?;
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let same = match (&fresh, &state.current) {
            (Some(a), Some(b)) => a.expose() == b.expose(),
            (None, None) => true,
            _ => false,
        };
        if same {
            return Ok(false);
        }
        let replaced = std::mem::replace(&mut state.current, fresh);
        state.previous = replaced.map(|token| (token, Instant::now() + self.window));
        Ok(true)
    }

    /// Reloads on every SIGHUP until `stop` fires (logging what happened, never the token).
    pub fn reload_on_hangup(self: &Arc<Self>, stop: CancellationToken) {
        let Some(file) = self.args.file.clone() else {
            return;
        };
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGHUP; the token file is read at start only");
                return;
            }
        };
        let tokens = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    got = hangups.recv() => if got.is_none() { break },
                }
                log_reload(&file, tokens.reload(), tokens.window);
            }
        });
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

fn log_reload(file: &std::path::Path, reloaded: Result<bool, String>, window: Duration) {
    let file = file.display();
    match reloaded {
        Ok(true) => tracing::info!(
            %file,
            previous_accepted_for_s = window.as_secs(),
            "SIGHUP: the token file holds a new token; it is used from now on"
        ),
        Ok(false) => tracing::info!(%file, "SIGHUP: the token file is unchanged"),
        Err(err) => {
            tracing::error!(%file, error = %err, "SIGHUP: the token file is not usable; the token in force stays")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_token_file_brings_the_new_token_and_keeps_the_old_one_for_the_window() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("token");
        let (old, new) = (
            "the-old-token-of-enough-length",
            "the-new-token-of-enough-length",
        );
        std::fs::write(&path, old).expect("write");
        let args = TokenArgs {
            value: None,
            file: Some(path.clone()),
        };
        let tokens = Tokens::new(args, Duration::from_millis(200)).expect("tokens");
        assert!(tokens.accepts(old) && !tokens.accepts(new));
        assert_eq!(tokens.reload(), Ok(false), "unchanged");
        std::fs::write(&path, format!("{new}\n")).expect("write");
        assert_eq!(tokens.reload(), Ok(true));
        assert_eq!(
            tokens.current().map(|t| t.expose().to_owned()).as_deref(),
            Some(new)
        );
        assert!(
            tokens.accepts(new) && tokens.accepts(old),
            "both during the window"
        );
        std::thread::sleep(Duration::from_millis(250));
        assert!(
            tokens.accepts(new) && !tokens.accepts(old),
            "the old one expired"
        );
        // A broken file changes nothing.
        std::fs::write(&path, "short").expect("write");
        assert!(tokens.reload().is_err());
        assert!(tokens.accepts(new));
        // A token given as a value is never reloaded; none means no check.
        let fixed = TokenArgs {
            value: Some(old.parse().expect("secret")),
            file: None,
        };
        assert_eq!(
            Tokens::new(fixed, Duration::ZERO).expect("tokens").reload(),
            Ok(false)
        );
        let none = Tokens::new(TokenArgs::default(), Duration::ZERO).expect("tokens");
        assert!(!none.required() && none.accepts("anything"));
    }
}
