//! The SCRAM-SHA-256 client against a hostile server. Two modes, picked by the first byte:
//!
//! - raw: the rest is server-first and server-final (split at the first NUL). Whatever they
//!   contain, the client must not panic and must never accept a server signature, which the
//!   fuzzer cannot compute;
//! - structured: the rest seeds a well-formed exchange (salt, iteration count, nonce, extra
//!   attributes) that this target completes as a real server would. The client's proof must
//!   verify, the true server signature must be accepted, and a corrupted one refused.

#![no_main]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dbward::upstream::scram::{ChannelBinding, ScramClient};
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

const NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
const PASSWORD: &[u8] = b"v-token-payments-Xy8kPq2";
/// Iteration counts above this are skipped: the time would go into PBKDF2, which is not under
/// test (the cap on server-chosen counts has its own unit test).
const MAX_FUZZ_ITERATIONS: u64 = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let binding = match mode % 3 {
        0 => ChannelBinding::Unsupported,
        1 => ChannelBinding::NotOffered,
        _ => ChannelBinding::TlsServerEndPoint(Sha256::digest(rest).to_vec()),
    };
    if mode & 0x80 == 0 {
        raw(rest, binding);
    } else {
        structured(rest, binding);
    }
});

fn too_many_iterations(server_first: &[u8]) -> bool {
    std::str::from_utf8(server_first)
        .ok()
        .and_then(|s| s.split(',').find_map(|a| a.strip_prefix("i=")))
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_FUZZ_ITERATIONS)
}

fn raw(data: &[u8], binding: ChannelBinding) {
    let (first, last) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if too_many_iterations(first) {
        return;
    }
    let mut client = ScramClient::with_nonce("", PASSWORD, NONCE.to_string(), binding);
    let _ = client.client_first();
    if let Ok(client_final) = client.handle_server_first(first) {
        let text = String::from_utf8(client_final).expect("client-final is text");
        assert!(
            text.starts_with("c=") && text.contains(",r=") && text.contains(",p="),
            "{text}"
        );
        assert!(
            client.handle_server_final(last).is_err(),
            "accepted a signature the fuzzer could not know"
        );
        assert!(!client.is_verified());
    }
    // Whatever happened, a second server-first is out of order.
    assert!(client.handle_server_first(first).is_err());
    assert!(!client.is_verified());
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn structured(data: &[u8], binding: ChannelBinding) {
    if data.len() < 4 {
        return;
    }
    let iterations = 1 + u64::from(data[0]) % MAX_FUZZ_ITERATIONS;
    let salt_len = 1 + usize::from(data[1] % 32);
    let corrupt_at = usize::from(data[2]);
    let rest = &data[3..];
    let salt: Vec<u8> = rest.iter().copied().cycle().take(salt_len).collect();
    // Server nonce: printable, no comma, at least one character of its own.
    let suffix: String = rest
        .iter()
        .map(|b| (b'!' + b % 90) as char)
        .map(|c| if c == ',' { '-' } else { c })
        .collect();
    let suffix = if suffix.is_empty() { "x".to_string() } else { suffix };
    let server_first = format!("r={NONCE}{suffix},s={},i={iterations}", B64.encode(&salt));

    let cb_data = match &binding {
        ChannelBinding::TlsServerEndPoint(h) => h.clone(),
        _ => Vec::new(),
    };
    let mut client = ScramClient::with_nonce("", PASSWORD, NONCE.to_string(), binding);
    let client_first = String::from_utf8(client.client_first()).unwrap();
    let (gs2, bare) = client_first.split_at(client_first.find(",,").expect("GS2 header") + 2);
    let client_final = String::from_utf8(
        client
            .handle_server_first(server_first.as_bytes())
            .expect("well-formed server-first"),
    )
    .unwrap();

    // Verify as Postgres does.
    let (without_proof, proof) = client_final.rsplit_once(",p=").expect("proof");
    let c = without_proof
        .strip_prefix("c=")
        .and_then(|s| s.split(',').next())
        .unwrap();
    let mut expected_c = gs2.as_bytes().to_vec();
    expected_c.extend_from_slice(&cb_data);
    assert_eq!(B64.decode(c).unwrap(), expected_c, "channel binding attribute");
    assert!(without_proof.ends_with(&format!(",r={NONCE}{suffix}")));
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(PASSWORD, &salt, iterations as u32, &mut salted);
    let stored_key = Sha256::digest(hmac(&salted, b"Client Key"));
    let auth_message = format!("{bare},{server_first},{without_proof}");
    let client_signature = hmac(&stored_key, auth_message.as_bytes());
    let proof = B64.decode(proof).unwrap();
    let client_key: Vec<u8> = proof.iter().zip(client_signature).map(|(p, s)| p ^ s).collect();
    assert_eq!(Sha256::digest(&client_key), stored_key, "client proof does not verify");

    let server_signature = hmac(&hmac(&salted, b"Server Key"), auth_message.as_bytes());
    let server_final = format!("v={}", B64.encode(server_signature));
    if corrupt_at % 2 == 0 {
        client
            .handle_server_final(server_final.as_bytes())
            .expect("true server signature refused");
        assert!(client.is_verified());
    } else {
        let mut corrupted = server_final.into_bytes();
        let i = (corrupt_at / 2) % corrupted.len();
        corrupted[i] ^= 1 + (data[0] & 0x3f);
        assert!(
            client.handle_server_final(&corrupted).is_err(),
            "accepted a corrupted signature"
        );
        assert!(!client.is_verified());
    }
}
