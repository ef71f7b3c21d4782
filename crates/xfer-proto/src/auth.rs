//! Challenge–response authentication with a shared token: HMAC-SHA256 over both sides' fresh
//! nonces, so the token never crosses the wire and a recorded handshake cannot be replayed.
//! Each side proves knowledge of the token under its own label, so one side's proof can never be
//! reflected back as the other's.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes in each nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes in a proof (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;

const CLIENT_LABEL: &[u8] = b"xfer/1 client proof";
const SERVER_LABEL: &[u8] = b"xfer/1 server proof";

fn mac(token: &[u8], label: &[u8], client_nonce: &[u8], server_nonce: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(token).expect("HMAC takes keys of any length");
    mac.update(label);
    mac.update(&(client_nonce.len() as u32).to_be_bytes());
    mac.update(client_nonce);
    mac.update(&(server_nonce.len() as u32).to_be_bytes());
    mac.update(server_nonce);
    mac
}

/// The client's proof: `HMAC-SHA256(token, "xfer/1 client proof" | len | cn | len | sn)`.
pub fn client_proof(token: &[u8], client_nonce: &[u8], server_nonce: &[u8]) -> Vec<u8> {
    mac(token, CLIENT_LABEL, client_nonce, server_nonce)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// The server's proof, sent in `Welcome`: the same with the label `"xfer/1 server proof"`.
pub fn server_proof(token: &[u8], client_nonce: &[u8], server_nonce: &[u8]) -> Vec<u8> {
    mac(token, SERVER_LABEL, client_nonce, server_nonce)
        .finalize()
        .into_bytes()
        .to_vec()
}

const ZERO_RTT_CLIENT_LABEL: &[u8] = b"xfer/1 zero-rtt proof";

fn zero_rtt_mac(token: &[u8], client_nonce: &[u8], time_ms: u64) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(token).expect("HMAC takes keys of any length");
    mac.update(ZERO_RTT_CLIENT_LABEL);
    mac.update(&(client_nonce.len() as u32).to_be_bytes());
    mac.update(client_nonce);
    mac.update(&time_ms.to_be_bytes());
    mac
}

/// The client's early proof (`EarlyAuth`, `CAP_ZERO_RTT`), made before it has the server's
/// nonce: `HMAC-SHA256(token, "xfer/1 zero-rtt proof" | u32 len | cn | u64 time_ms)`.
pub fn zero_rtt_proof(token: &[u8], client_nonce: &[u8], time_ms: u64) -> Vec<u8> {
    zero_rtt_mac(token, client_nonce, time_ms)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Checks a client's early proof in constant time.
pub fn verify_zero_rtt(token: &[u8], client_nonce: &[u8], time_ms: u64, proof: &[u8]) -> bool {
    zero_rtt_mac(token, client_nonce, time_ms)
        .verify_slice(proof)
        .is_ok()
}

/// The key a grant's bearer proves instead of the token:
/// `HMAC-SHA256(token, "xfer/1 grant" | u32 len | scope | u64 expires | u32 len | nonce)`.
/// Only a holder of the token can make it, and it is bound to this scope, expiry and nonce.
pub fn grant_key(token: &[u8], grant: &crate::Grant) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(token).expect("HMAC takes keys of any length");
    mac.update(b"xfer/1 grant");
    mac.update(&(grant.scope.len() as u32).to_be_bytes());
    mac.update(grant.scope.as_bytes());
    mac.update(&grant.expires.to_be_bytes());
    mac.update(&(grant.nonce.len() as u32).to_be_bytes());
    mac.update(&grant.nonce);
    mac.finalize().into_bytes().to_vec()
}

/// Checks a client's proof in constant time.
pub fn verify_client(token: &[u8], client_nonce: &[u8], server_nonce: &[u8], proof: &[u8]) -> bool {
    mac(token, CLIENT_LABEL, client_nonce, server_nonce)
        .verify_slice(proof)
        .is_ok()
}

/// Checks a server's proof in constant time.
pub fn verify_server(token: &[u8], client_nonce: &[u8], server_nonce: &[u8], proof: &[u8]) -> bool {
    mac(token, SERVER_LABEL, client_nonce, server_nonce)
        .verify_slice(proof)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_keys_depend_on_every_field() {
        let g = crate::Grant {
            scope: "backups/a".into(),
            expires: 100,
            nonce: vec![1; 32],
        };
        let k = grant_key(b"tok", &g);
        assert_eq!(k.len(), 32);
        assert_ne!(k, grant_key(b"tok2", &g));
        assert_ne!(
            k,
            grant_key(
                b"tok",
                &crate::Grant {
                    scope: "backups".into(),
                    ..g.clone()
                }
            )
        );
        assert_ne!(
            k,
            grant_key(
                b"tok",
                &crate::Grant {
                    expires: 101,
                    ..g.clone()
                }
            )
        );
        assert_ne!(
            k,
            grant_key(
                b"tok",
                &crate::Grant {
                    nonce: vec![2; 32],
                    ..g.clone()
                }
            )
        );
    }

    #[test]
    fn early_proofs_verify_only_with_the_same_token_nonce_and_time() {
        let cn = [1u8; NONCE_LEN];
        let p = zero_rtt_proof(b"secret", &cn, 1000);
        assert_eq!(p.len(), PROOF_LEN);
        assert!(verify_zero_rtt(b"secret", &cn, 1000, &p));
        assert!(!verify_zero_rtt(b"secreT", &cn, 1000, &p));
        assert!(!verify_zero_rtt(b"secret", &cn, 1001, &p), "another time");
        assert!(!verify_zero_rtt(b"secret", &[2u8; NONCE_LEN], 1000, &p));
        let challenge_proof = client_proof(b"secret", &cn, &1000u64.to_be_bytes());
        assert!(!verify_zero_rtt(b"secret", &cn, 1000, &challenge_proof));
    }

    #[test]
    fn proofs_verify_only_with_the_same_token_and_nonces() {
        let (cn, sn) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        let p = client_proof(b"secret", &cn, &sn);
        assert_eq!(p.len(), PROOF_LEN);
        assert!(verify_client(b"secret", &cn, &sn, &p));
        assert!(!verify_client(b"secreT", &cn, &sn, &p));
        assert!(!verify_client(b"secret", &sn, &cn, &p));
        assert!(
            !verify_client(b"secret", &cn, &[3u8; NONCE_LEN], &p),
            "replay with a new nonce"
        );
        assert!(
            !verify_server(b"secret", &cn, &sn, &p),
            "a client proof is no server proof"
        );
        assert!(!verify_client(b"secret", &cn, &sn, &p[..31]));
        let s = server_proof(b"secret", &cn, &sn);
        assert!(verify_server(b"secret", &cn, &sn, &s));
    }
}
