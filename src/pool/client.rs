//! What the client has sent, as far as reuse of its server connection is concerned: where its
//! messages begin (a Terminate must not reach a kept server, and a half-sent message makes the
//! connection unusable), how many answers it is owed (each Query, Sync and FunctionCall gets
//! one ReadyForQuery), and whether extended-protocol messages are waiting for a Sync.

/// Follows the client-to-server stream of typed messages.
#[derive(Debug, Default)]
pub(crate) struct ClientMessages {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
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
            if self.body_left > 0 {
                let n = self.body_left.min(data.len() - at);
                self.body_left -= n;
                at += n;
                continue;
            }
            if self.header_len == 0 && data[at] == b'X' {
                return Seen::Terminate(at);
            }
            let n = (5 - self.header_len).min(data.len() - at);
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[at..at + n]);
            self.header_len += n;
            at += n;
            if self.header_len == 5 {
                let len = u32::from_be_bytes(self.header[1..5].try_into().expect("4 bytes"));
                self.body_left = (len as usize).saturating_sub(4);
                self.header_len = 0;
                match self.header[0] {
                    b'Q' | b'F' => self.syncs += 1,
                    b'S' => {
                        self.syncs += 1;
                        self.unsynced = false;
                    }
                    b'P' | b'B' | b'E' | b'D' | b'C' | b'H' => self.unsynced = true,
                    _ => {}
                }
            }
        }
        Seen::More
    }

    /// Between two messages, with no extended-protocol messages waiting for a Sync.
    pub(crate) fn settled(&self) -> bool {
        self.header_len == 0 && self.body_left == 0 && !self.unsynced
    }

    /// Messages sent so far that the server answers with ReadyForQuery.
    pub(crate) fn syncs(&self) -> u64 {
        self.syncs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

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
