//! Any answer a broken or hostile Vault can give: the first two bytes pick the HTTP status
//! (mostly 200), the rest is the body. It goes through dbward's parsing of login, lookup-self,
//! renew-self and secret reads (dynamic, static, KV) and the token and lease time computations
//! that follow (expiry, renewal at 2/3, retirement, refresh schedule). None may panic, and no
//! TTL taken from the answer may exceed the 10-year clamp.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (status, body) = match data {
        [a, b, rest @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            // Bias to 2xx, where the parsers run; the rest exercises the error texts.
            let status = if code < 0xc000 { 200 + code % 5 } else { 100 + code % 500 };
            (status, rest)
        }
        _ => (200, data),
    };
    dbward::vault::fuzzing::vault_response(status, body);
});
