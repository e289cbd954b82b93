//! What the client has sent, as far as reuse of its server connection is concerned: where its
//! messages begin (a Terminate must not reach a kept server, and a half-sent message makes the
//! connection unusable), how many answers it is owed (each Query, Sync and FunctionCall gets
//! one ReadyForQuery), and whether extended-protocol messages are waiting for a Sync.

use crate::pg::frame::Framer;

/// Follows the client-to-server stream of typed messages.
#[derive(Debug, Default)]
pub(crate) struct ClientMessages {
    frame: Framer,
    /// Messages that the server answers with ReadyForQuery.
    syncs: u64,
    /// Parse, Bind, Execute, Describe, Close or Flush since the last Sync.
    unsynced: bool,
}

/// What [`ClientMessages::advance`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Everything passed; forward it all.
    More,
    /// A Terminate begins at this offset: forward the bytes before it only.
    Terminate(usize),
}

impl ClientMessages {
    /// Accounts for bytes the client sent, stopping at the start of a Terminate message.
    pub(crate) fn advance(&mut self, data: &[u8]) -> Seen {
        let mut at = 0;
        while at < data.len() {
            let rest = &data[at..];
            if self.frame.body_left() > 0 {
                at += self.frame.skip_body(rest.len());
                continue;
            }
            if self.frame.at_boundary() && rest[0] == b'X' {
                return Seen::Terminate(at);
            }
            let (n, tag) = self.frame.take_header(rest);
            at += n;
            match tag {
                Some(b'Q' | b'F') => self.syncs += 1,
                Some(b'S') => {
                    self.syncs += 1;
                    self.unsynced = false;
                }
                Some(b'P' | b'B' | b'E' | b'D' | b'C' | b'H') => self.unsynced = true,
                _ => {}
            }
        }
        Seen::More
    }

    /// Between two messages, with no extended-protocol messages waiting for a Sync.
    pub(crate) fn settled(&self) -> bool {
        self.frame.at_boundary() && !self.unsynced
    }

    /// Messages sent so far that the server answers with ReadyForQuery.
    pub(crate) fn syncs(&self) -> u64 {
        self.syncs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::frame::msg;

    #[test]
    fn terminate_is_found_at_a_message_start_in_any_chunking() {
        // An 'X' inside a query's text is not a Terminate.
        let stream = [
            msg(b'Q', b"select 'X'\0"),
            msg(b'P', b"\0select 1\0\0\0"),
            msg(b'S', b""),
            msg(b'X', b""),
        ]
        .concat();
        let x_at = stream.len() - 5;
        for chunk in 1..=stream.len() {
            let mut c = ClientMessages::default();
            let mut at = 0;
            let mut found = None;
            while at < stream.len() {
                let end = (at + chunk).min(stream.len());
                if let Seen::Terminate(i) = c.advance(&stream[at..end]) {
                    found = Some(at + i);
                    break;
                }
                at = end;
            }
            assert_eq!(found, Some(x_at), "chunk size {chunk}");
            assert_eq!(c.syncs(), 2);
            assert!(c.settled());
        }
    }

    #[test]
    fn half_sent_and_unsynced_messages_are_not_settled() {
        let mut c = ClientMessages::default();
        c.advance(&msg(b'Q', b"select 1\0")[..7]);
        assert!(!c.settled(), "half a Query");
        let mut c = ClientMessages::default();
        c.advance(&[msg(b'P', b"\0select 1\0\0\0"), msg(b'B', b"\0\0\0\0\0\0\0\0")].concat());
        assert!(!c.settled(), "Parse and Bind without Sync");
        c.advance(&msg(b'S', b""));
        assert!(c.settled());
    }
}
