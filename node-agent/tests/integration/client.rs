//! The typed admin API client against a real agent: each method answers
//! the API's own types, long jobs report progress, and a refusal keeps
//! its HTTP status, the agent's message and the field at fault.

use crate::common;

use std::time::Duration;

use common::{wait_until, Fleet};
use hyper::StatusCode;
use node_agent::client::{ClientError, JobEvent, VolumeCreated};

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_calls_answer_typed_values_and_refusals_keep_status_and_field() {
    let fleet = Fleet::init("a", &[]);
    let mut agent = fleet.start("a");
    let c = fleet.client("a");
    wait_until(Duration::from_secs(10), "api up", || async {
        c.status().await.is_ok()
    })
    .await;
    assert_eq!(c.status().await.unwrap().rack, "a");

    // Create: 201 with the parsed size; a second time 409; a bad size 400
    // naming the field.
    assert_eq!(
        c.volume_create("db", "4M").await.unwrap(),
        VolumeCreated {
            name: "db".into(),
            size_bytes: 4 << 20
        }
    );
    let again = c.volume_create("db", "4M").await.unwrap_err();
    assert_eq!(again.status(), Some(StatusCode::CONFLICT), "{again}");
    match c.volume_create("odd", "3").await.unwrap_err() {
        ClientError::Answer {
            status,
            message,
            field,
        } => {
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(field.as_deref(), Some("size"));
            assert!(message.contains("size"), "{message}");
        }
        other => panic!("expected the agent's refusal, got {other:?}"),
    }
    let snap = c.volume_snapshot("db").await.unwrap();
    assert_eq!(snap.volume, "db");
    assert!(snap.generation >= 1);

    // Import: progress in bytes of the image, then the new generation.
    let cfg = deploy::RackConfig::load(&fleet.config("a")).unwrap();
    let import_dir = cfg.data_dir.join("import");
    std::fs::create_dir_all(&import_dir).unwrap();
    let image: Vec<u8> = (0..2 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    let src = import_dir.join("img.raw");
    std::fs::write(&src, &image).unwrap();
    let src = std::fs::canonicalize(src).unwrap();
    let mut events = Vec::new();
    let imported = c
        .volume_import("img", &src, |e| events.push(e))
        .await
        .unwrap();
    assert_eq!(imported.volume, "img");
    for e in &events {
        let JobEvent::Progress { done, total } = *e else {
            panic!("an import only reports progress: {events:?}");
        };
        assert!(done <= total && total == image.len() as u64, "{events:?}");
    }

    // A job that fails once under way: the stream's status and the job's
    // error line.
    let outside = fleet.dir.path().join("outside.raw");
    std::fs::write(&outside, &image).unwrap();
    let outside = std::fs::canonicalize(outside).unwrap();
    match c.volume_import("img", &outside, |_| {}).await.unwrap_err() {
        ClientError::Answer {
            status, message, ..
        } => {
            assert_eq!(status, StatusCode::OK);
            assert!(
                message.contains("outside the import directories"),
                "{message}"
            );
        }
        other => panic!("expected the job's error, got {other:?}"),
    }

    // Export writes the generation back out, byte for byte.
    let out = fleet.dir.path().join("out.img");
    let exported = c.volume_export("img", &out, None, |_| {}).await.unwrap();
    assert_eq!(exported.to, out);
    assert_eq!(std::fs::read(&out).unwrap(), image);

    let names: Vec<String> = c
        .volumes()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert!(
        names.contains(&"db".into()) && names.contains(&"img".into()),
        "{names:?}"
    );
    assert_eq!(c.volume_scrub().await.unwrap().corrupt, 0);

    // Kept copies: none on a rack that never gave a volume up; asking for
    // one is a 404 naming it, for export and for drop.
    assert!(c.volumes_kept().await.unwrap().is_empty());
    assert!(c.status().await.unwrap().volumes_kept.is_empty());
    let gone = c.volume_drop_kept("img", 1234).await.unwrap_err();
    assert_eq!(gone.status(), Some(StatusCode::NOT_FOUND), "{gone}");
    match c
        .volume_export_kept("img", 1234, &out, |_| {})
        .await
        .unwrap_err()
    {
        ClientError::Answer { message, .. } => {
            assert!(message.contains("no kept copy of volume img"), "{message}")
        }
        other => panic!("expected the job's error, got {other:?}"),
    }

    // Appliances: none deployed; an unknown one is 404 (or 503 while the
    // one-rack control plane elects itself).
    assert!(c.apps().await.unwrap().is_empty());
    let unknown = c.app_stop("nope").await.unwrap_err();
    assert!(
        matches!(
            unknown.status(),
            Some(StatusCode::NOT_FOUND | StatusCode::SERVICE_UNAVAILABLE)
        ),
        "{unknown}"
    );

    assert!(c.cache_offline(true).await.unwrap().offline);
    assert!(!c.cache_offline(false).await.unwrap().offline);
    assert!(c.events(3).await.unwrap().len() <= 3);
    assert!(c.revocations().await.unwrap().is_empty());
    assert!(c.metrics().await.unwrap().contains("fieldrack_peers"));

    // A stopped agent: a connection error naming the address.
    agent.sigkill();
    match c.status().await.unwrap_err() {
        ClientError::Connect { addr, .. } => assert_eq!(addr, cfg.api.listen),
        other => panic!("expected a connection error, got {other:?}"),
    }
}
