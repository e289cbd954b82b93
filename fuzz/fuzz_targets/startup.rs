//! Everything a client can send before authentication: the length-prefixed startup packets
//! (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest) through both the whole-packet
//! parser and the buffered reader the session uses, and the message-boundary tracker the relay
//! runs over server bytes. Besides not panicking, checks that what is parsed re-encodes to the
//! same thing and that every reply dbward would build from it is well-formed.

#![no_main]

use bytes::BytesMut;
use dbward::pg::cancel::BackendKey;
use dbward::pg::frame::Boundaries;
use dbward::pg::startup::{self, StartupError, StartupPacket, NEWEST_MINOR};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match startup::parse(data) {
        Ok(p) => check_packet(&p),
        Err(e) => check_error(&e),
    }

    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match startup::take_packet(&mut buf) {
            Ok(Some(p)) => {
                assert!(buf.len() + 8 <= before, "a packet is at least 8 bytes");
                check_packet(&p);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "nothing is consumed while a packet is incomplete");
                break;
            }
            Err(e) => {
                check_error(&e);
                break;
            }
        }
    }

    // Chunking must not change where messages end.
    let mut whole = Boundaries::default();
    whole.advance(data);
    let mut bytewise = Boundaries::default();
    for b in data {
        bytewise.advance(std::slice::from_ref(b));
    }
    assert_eq!(whole.at_boundary(), bytewise.at_boundary());
    assert_eq!(whole.to_boundary(), bytewise.to_boundary());
    assert_eq!(whole.idle_between_transactions(), bytewise.idle_between_transactions());
    assert_eq!(whole.ready_count(), bytewise.ready_count());
});

fn check_packet(p: &StartupPacket) {
    match p {
        StartupPacket::Startup(m) => {
            assert_eq!(m.major, 3);
            assert!(m.protocol_options.iter().all(|o| o.starts_with("_pq_.")));
            assert!(matches!(m.secret_len(), 4 | 32));

            let v = m.negotiate_protocol_version();
            assert_eq!(v[0], b'v');
            assert_eq!(u32::from_be_bytes(v[1..5].try_into().unwrap()) as usize, v.len() - 1);
            let version = u32::from_be_bytes(v[5..9].try_into().unwrap());
            assert_eq!(version >> 16, 3);
            let minor = (version & 0xffff) as u16;
            assert!(
                minor <= m.minor && minor <= NEWEST_MINOR,
                "never offers more than asked or known"
            );
            let count = u32::from_be_bytes(v[9..13].try_into().unwrap()) as usize;
            assert_eq!(count, m.protocol_options.len());
            assert_eq!(v[13..].iter().filter(|b| **b == 0).count(), count);

            // What goes upstream is what was received.
            let encoded = startup::encode_startup(&m.params);
            assert_eq!(
                u32::from_be_bytes(encoded[..4].try_into().unwrap()) as usize,
                encoded.len()
            );
            match startup::parse(&encoded[4..]) {
                Ok(StartupPacket::Startup(again)) => assert_eq!(again.params, m.params),
                other => panic!("re-encoded startup does not parse back: {other:?}"),
            }
        }
        StartupPacket::Cancel { pid, secret } => {
            let key = BackendKey {
                pid: *pid,
                secret: secret.clone(),
            };
            let request = key.cancel_request();
            assert_eq!(startup::parse(&request[4..]).unwrap(), *p);
            let mut k = BytesMut::new();
            key.encode(&mut k);
            assert_eq!(k[0], b'K');
            assert_eq!(u32::from_be_bytes(k[1..5].try_into().unwrap()) as usize, k.len() - 1);
        }
        StartupPacket::SslRequest | StartupPacket::GssEncRequest => {}
    }
}

fn check_error(e: &StartupError) {
    let StartupError::Refuse { error: e, .. } = e else {
        // Closed without a word, as Postgres does.
        return;
    };
    assert_eq!(e.severity, "FATAL");
    assert_eq!(e.code.len(), 5);
    let mut bytes = e.to_bytes();
    if e.protocol2 {
        // 'E' and one NUL-terminated text, as a protocol-2 client reads it.
        assert_eq!(bytes[0], b'E');
        assert_eq!(bytes.iter().filter(|b| **b == 0).count(), 1);
        assert_eq!(bytes.last(), Some(&0));
        return;
    }
    // The reply parses as the ErrorResponse a client expects, even with odd input in the message.
    match postgres_protocol::message::backend::Message::parse(&mut bytes) {
        Ok(Some(postgres_protocol::message::backend::Message::ErrorResponse(_))) => {}
        _ => panic!("malformed ErrorResponse for {e:?}"),
    }
    assert!(bytes.is_empty());
}
