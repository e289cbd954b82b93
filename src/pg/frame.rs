//! Message boundaries in the relayed server-to-client stream. The relay does not parse
//! messages, but it must know where one ends: an ErrorResponse dbward adds (57P01 at shutdown)
//! has to go between two server messages, not into the middle of a DataRow. Also the one
//! typed message dbward writes to clients on its own behalf besides errors and cancel keys:
//! AuthenticationOk (postgres-protocol encodes only frontend messages).

/// AuthenticationOk ('R', code 0): dbward authenticates clients itself, by who may reach it.
pub(crate) fn authentication_ok(buf: &mut bytes::BytesMut) {
    use bytes::BufMut;
    buf.put_u8(b'R');
    buf.put_i32(8);
    buf.put_i32(0);
}

/// The framing of a stream of typed messages (type byte, 4-byte length that counts itself,
/// body), followed across reads of any size. The server-to-client tracker ([`Boundaries`]) and
/// the pool's client-to-server one (`pool::client`) each add what they look for in the headers.
#[derive(Debug, Default, Clone)]
pub(crate) struct Framer {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
}

impl Framer {
    /// Bytes of the current message's body still to come (0 while in a header or between
    /// messages).
    #[inline]
    pub(crate) fn body_left(&self) -> usize {
        self.body_left
    }

    /// True between two messages.
    #[inline]
    pub(crate) fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }

    /// Passes over up to `available` bytes of the current body; returns how many.
    #[inline]
    pub(crate) fn skip_body(&mut self, available: usize) -> usize {
        let n = self.body_left.min(available);
        self.body_left -= n;
        n
    }

    /// Takes header bytes from the start of `data` (outside a body): returns how many it took,
    /// and the message's type byte once the header's fifth byte has passed (its body length is
    /// then [`Framer::body_left`]).
    #[inline]
    pub(crate) fn take_header(&mut self, data: &[u8]) -> (usize, Option<u8>) {
        let n = (5 - self.header_len).min(data.len());
        self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
        self.header_len += n;
        if self.header_len < 5 {
            return (n, None);
        }
        self.header_len = 0;
        let len = u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
        // A length below 4 is a broken stream; counting it as an empty body keeps the tracker
        // moving instead of wedging it.
        self.body_left = (len as usize).saturating_sub(4);
        (n, Some(self.header[0]))
    }

    /// How many more bytes belong to the current message as far as is known yet (the rest of
    /// its header, then the rest of its body); 0 at a boundary.
    pub(crate) fn to_boundary(&self) -> usize {
        if self.header_len > 0 {
            5 - self.header_len
        } else {
            self.body_left
        }
    }
}

/// Follows the server-to-client stream: where each message ends, and whether the last one was
/// an idle ReadyForQuery.
#[derive(Debug, Default, Clone)]
pub struct Boundaries {
    frame: Framer,
    /// The last whole message was ReadyForQuery with status `I` (idle, no transaction open),
    /// and nothing has followed it yet.
    idle: bool,
    /// Inside a ReadyForQuery whose status byte has not passed yet.
    in_ready: bool,
    /// ReadyForQuery messages passed so far: the pool compares it with the Syncs and Queries
    /// the client sent, so that a connection is kept only when every one was answered.
    ready: u64,
}

impl Boundaries {
    /// Accounts for bytes that passed.
    pub fn advance(&mut self, mut data: &[u8]) {
        loop {
            data = self.skip_whole(data);
            let Some(&first) = data.first() else { return };
            let n = if self.frame.body_left() > 0 {
                if self.in_ready {
                    // ReadyForQuery's body is its one status byte.
                    self.idle = first == b'I';
                    self.in_ready = false;
                    self.ready += 1;
                }
                self.frame.skip_body(data.len())
            } else {
                self.idle = false;
                let (n, tag) = self.frame.take_header(data);
                if let Some(tag) = tag {
                    self.in_ready = tag == b'Z' && self.frame.body_left() > 0;
                }
                n
            };
            data = &data[n..];
        }
    }

    /// Passes over the whole messages at the start of `data` when it starts at a boundary,
    /// reading each header where it lies; returns the rest. While COPY or a large result
    /// streams, almost every message is whole within a read, so this is all the relay does per
    /// message: two loads and a jump. A partial message is left to the byte-exact path.
    #[inline]
    fn skip_whole<'d>(&mut self, mut data: &'d [u8]) -> &'d [u8] {
        if !self.frame.at_boundary() || self.in_ready {
            return data;
        }
        while let [tag, a, b, c, d, rest @ ..] = data {
            let body = (u32::from_be_bytes([*a, *b, *c, *d]) as usize).saturating_sub(4);
            if body > rest.len() {
                // The message goes on past this read: the byte-exact path records where.
                break;
            }
            // As the byte-exact path judges it: a ReadyForQuery is idle by its first body byte.
            self.idle = *tag == b'Z' && body > 0 && rest[0] == b'I';
            if *tag == b'Z' && body > 0 {
                self.ready += 1;
            }
            data = &rest[body..];
        }
        data
    }

    /// True between two messages.
    pub fn at_boundary(&self) -> bool {
        self.frame.at_boundary()
    }

    /// True right after a ReadyForQuery with status `I` reached the client, before anything
    /// else: the session is between transactions, the one point where closing it loses nothing
    /// the server was doing.
    pub fn idle_between_transactions(&self) -> bool {
        self.idle && self.at_boundary()
    }

    /// ReadyForQuery messages passed so far.
    pub fn ready_count(&self) -> u64 {
        self.ready
    }

    /// How many more bytes belong to the current message as far as is known yet (the rest of
    /// its header, then the rest of its body); 0 at a boundary.
    pub fn to_boundary(&self) -> usize {
        self.frame.to_boundary()
    }
}

/// A whole typed message, for tests that build streams.
#[cfg(test)]
pub(crate) fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_in_any_chunking() {
        let stream = [msg(b'D', &[1; 300]), msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")].concat();
        let ends = [305usize, 305 + 14, 305 + 14 + 6];
        for chunk in 1..=stream.len() {
            let mut b = Boundaries::default();
            let mut at = 0;
            let mut seen = Vec::new();
            while at < stream.len() {
                // Never step over a boundary, so every one of them is observed.
                let step = match b.to_boundary() {
                    0 => 5,
                    n => n,
                }
                .min(chunk)
                .min(stream.len() - at);
                b.advance(&stream[at..at + step]);
                at += step;
                if b.at_boundary() {
                    seen.push(at);
                }
            }
            assert_eq!(seen, ends, "chunk size {chunk}");
        }
    }

    #[test]
    fn idle_only_right_after_ready_for_query_with_status_i_in_any_chunking() {
        // BEGIN; SELECT; COMMIT as three simple queries: T, then T, then I.
        let stream = [
            msg(b'C', b"BEGIN\0"),
            msg(b'Z', b"T"),
            msg(b'D', &[7; 40]),
            msg(b'C', b"SELECT 1\0"),
            msg(b'Z', b"T"),
            msg(b'C', b"COMMIT\0"),
            msg(b'Z', b"I"),
            msg(b'N', &[1; 20]),
            msg(b'Z', b"E"),
            msg(b'Z', b"I"),
        ]
        .concat();
        let mut want = Vec::new();
        let mut at = 0;
        for m in [11, 6, 45, 14, 6, 12, 6, 25, 6, 6] {
            at += m;
            want.push(at);
        }
        let idle_at = [want[6], want[9]];
        for chunk in 1..=stream.len() {
            let mut b = Boundaries::default();
            assert!(!b.idle_between_transactions(), "idle before any ReadyForQuery");
            let mut seen = Vec::new();
            let mut at = 0;
            while at < stream.len() {
                let step = chunk.min(stream.len() - at);
                for i in 0..step {
                    b.advance(&stream[at + i..at + i + 1]);
                    if b.idle_between_transactions() {
                        seen.push(at + i + 1);
                    }
                }
                at += step;
            }
            assert_eq!(seen, idle_at, "chunk size {chunk}");
            // Whole chunks: idle is judged at the end of what passed.
            let mut b = Boundaries::default();
            b.advance(&stream[..want[6] + 3]);
            assert!(
                !b.idle_between_transactions(),
                "a NoticeResponse header started after it"
            );
        }
    }

    /// Everything the tracker reports after `data` passed in reads of `chunk` bytes.
    fn state_after(data: &[u8], chunk: usize) -> (bool, bool, u64, usize) {
        let mut b = Boundaries::default();
        for part in data.chunks(chunk) {
            b.advance(part);
        }
        (
            b.at_boundary(),
            b.idle_between_transactions(),
            b.ready_count(),
            b.to_boundary(),
        )
    }

    #[test]
    fn whole_messages_in_a_read_count_as_read_byte_by_byte() {
        // Reads that hold many whole messages take the fast path; reads that split them take
        // the byte-exact one. Both must agree at every cut, broken ReadyForQuery lengths too.
        let stream = [
            msg(b'H', &[0, 0, 2, 0, 0, 0, 0]),
            msg(b'd', &[b'x'; 200]),
            msg(b'd', &[b'y'; 3]),
            msg(b'c', b""),
            msg(b'C', b"COPY 2\0"),
            msg(b'Z', b"I"),
            msg(b'Z', b""),
            msg(b'Z', b"IT"),
            msg(b'D', &[9; 70]),
            msg(b'Z', b"T"),
            msg(b'Z', b"I"),
        ]
        .concat();
        for cut in 0..=stream.len() {
            let want = state_after(&stream[..cut], 1);
            for chunk in [2, 5, 6, 7, 64, 300, stream.len()] {
                assert_eq!(state_after(&stream[..cut], chunk), want, "cut {cut}, chunk {chunk}");
            }
        }
        // Four ReadyForQuery with a status byte; the empty one is not counted.
        assert_eq!(state_after(&stream, stream.len()), (true, true, 4, 0));
    }

    #[test]
    fn broken_lengths_do_not_wedge() {
        let mut b = Boundaries::default();
        b.advance(&[b'X', 0, 0, 0, 0, b'Y', 0, 0, 0, 4]);
        assert!(b.at_boundary());
    }

    #[test]
    fn authentication_ok_is_what_postgres_protocol_parses_as_such() {
        use postgres_protocol::message::backend::Message;
        let mut buf = bytes::BytesMut::new();
        authentication_ok(&mut buf);
        let mut b = Boundaries::default();
        b.advance(&buf);
        assert!(b.at_boundary(), "one whole message");
        assert!(matches!(Message::parse(&mut buf), Ok(Some(Message::AuthenticationOk))));
        assert!(buf.is_empty());
    }
}
