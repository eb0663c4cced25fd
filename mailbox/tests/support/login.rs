//! The owner login flow over HTTP (challenge, then a signed login), shared by the tests that
//! drive real mailbox processes (`mailbox/tests/node_process.rs`,
//! `relay/tests/mesh_processes.rs`, which includes this file by path).

use serde_json::{Value, json};
use whispr_mailbox::testkit::Owner;

/// Logs `owner`'s first device in at the node at `base`, named `audience`; the session token.
pub async fn login(http: &reqwest::Client, base: &str, owner: &Owner, audience: &str) -> String {
    let device = owner.device(0);
    let device_hex = hex::encode(device.verifying_key().to_bytes());
    let mailbox = hex::encode(owner.mailbox_id.as_bytes());
    let c: Value = http
        .post(format!("{base}/v1/auth/challenge"))
        .json(&json!({"mailbox_id": mailbox, "device_key": device_hex}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut challenge = [0u8; 32];
    hex::decode_to_slice(c["challenge"].as_str().unwrap(), &mut challenge).unwrap();
    assert_eq!(c["audience"], audience);
    let signature = owner.sign_login(&device, audience, &challenge);
    let r = http
        .post(format!("{base}/v1/auth/login"))
        .json(&json!({
            "mailbox_id": mailbox, "device_key": device_hex,
            "challenge": hex::encode(challenge), "signature": hex::encode(signature),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["token"].as_str().unwrap().to_string()
}
