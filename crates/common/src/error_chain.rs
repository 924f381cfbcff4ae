//! An error with its sources on one line, for logs, Events and status messages.

use std::error::Error;

/// `error` followed by each of its sources, `outer: inner: …`.
///
/// A source whose text the line already holds is skipped: many errors (reqwest's, hyper's,
/// those that wrap with `#[error("…: {0}")]`) repeat their cause in their own message, and
/// printing it twice makes the line harder to read, not more complete.
pub fn error_chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("connection refused")]
    struct Refused;

    #[derive(Debug, thiserror::Error)]
    #[error("connecting to 127.0.0.1:6421")]
    struct Connect(#[source] Refused);

    #[derive(Debug, thiserror::Error)]
    #[error("pulling the image: {0}")]
    struct Repeats(#[source] Refused);

    #[derive(Debug, thiserror::Error)]
    #[error("starting the cell")]
    struct Start(#[source] Connect);

    #[test]
    fn every_source_once_in_order() {
        assert_eq!(
            error_chain(&Start(Connect(Refused))),
            "starting the cell: connecting to 127.0.0.1:6421: connection refused"
        );
        assert_eq!(error_chain(&Refused), "connection refused");
    }

    #[test]
    fn a_source_the_message_already_holds_is_not_repeated() {
        assert_eq!(
            error_chain(&Repeats(Refused)),
            "pulling the image: connection refused"
        );
    }
}
