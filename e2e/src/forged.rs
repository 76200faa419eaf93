//! Made-up broker tokens for the flood tests and the bench: copies of a real pod-bound token
//! (its header, hence `alg` and `kid`, and its claims: issuer, audience, expiry, the pod's
//! name and uid) with a random signature of the same length. Only the signature is wrong.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;

/// `count` distinct forgeries of `real`.
pub fn forged_tokens(real: &str, count: usize) -> anyhow::Result<Vec<String>> {
    let (signed, signature) = real
        .rsplit_once('.')
        .ok_or_else(|| anyhow::anyhow!("not a JWT"))?;
    let len = URL_SAFE_NO_PAD.decode(signature)?.len();
    let mut rng = rand::rng();
    Ok((0..count)
        .map(|_| {
            let mut sig = vec![0u8; len];
            rng.fill_bytes(&mut sig);
            format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&sig))
        })
        .collect())
}
