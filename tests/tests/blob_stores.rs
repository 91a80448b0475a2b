//! The blob store's contract, the same on both implementations: the data directory and a real S3
//! server (SeaweedFS, started by `.ci/run`).

use bytes::Bytes;
use fedhive_e2e::S3Prefix;
use fedhive_server::blobs::BlobStore;

#[tokio::test(flavor = "multi_thread")]
async fn a_directory_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract(&BlobStore::open(dir.path().join("blobs")).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_s3_bucket_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = S3Prefix::new().open(&dir.path().join("blobs"));
    contract(&store).await;
    // Nothing went to local disk.
    assert_eq!(std::fs::read_dir(dir.path().join("blobs")).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_s3_server_fails_its_check() {
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = S3Prefix::new();
    for (key, value) in &mut s3.env {
        if key == "AWS_ENDPOINT" {
            // A port nothing listens on.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            *value = format!("http://127.0.0.1:{port}");
        }
    }
    let store = s3.open(&dir.path().join("blobs"));
    assert!(store.check().await.is_err());
    assert!(
        store
            .put("models/t/0.safetensors", Bytes::from_static(b"x"))
            .await
            .is_err()
    );
}

async fn contract(store: &BlobStore) {
    store.check().await.unwrap();
    let missing = store.get("models/t-1/0.safetensors").await.unwrap_err();
    assert_eq!(missing.kind(), std::io::ErrorKind::NotFound, "{missing}");
    store
        .put("models/t-1/0.safetensors", Bytes::from_static(b"v0"))
        .await
        .unwrap();
    store
        .put("models/t-1/1.safetensors", Bytes::from_static(b"v1"))
        .await
        .unwrap();
    store
        .put("updates/7/a.safetensors", Bytes::from_static(b"a"))
        .await
        .unwrap();
    store
        .put("updates/7/b.safetensors", Bytes::from_static(b"b"))
        .await
        .unwrap();
    store
        .put("updates/70/c.safetensors", Bytes::from_static(b"c"))
        .await
        .unwrap();
    // A put replaces.
    store
        .put("models/t-1/1.safetensors", Bytes::from_static(b"v1'"))
        .await
        .unwrap();
    assert_eq!(store.get("models/t-1/1.safetensors").await.unwrap(), &b"v1'"[..]);
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        sorted(store.list("models/t-1").await.unwrap()),
        ["0.safetensors", "1.safetensors"]
    );
    assert_eq!(
        sorted(store.list("updates/7").await.unwrap()),
        ["a.safetensors", "b.safetensors"]
    );
    assert!(store.list("updates/8").await.unwrap().is_empty());
    // Folders are not blobs: listed apart.
    assert_eq!(sorted(store.list_folders("updates").await.unwrap()), ["7", "70"]);
    assert!(store.list("updates").await.unwrap().is_empty());
    assert!(store.list_folders("updates/8").await.unwrap().is_empty());
    // A folder and everything in it, not its namesake's (`updates/70`).
    store.delete_prefix("updates/7").await.unwrap();
    assert!(store.list("updates/7").await.unwrap().is_empty());
    assert_eq!(store.list("updates/70").await.unwrap(), ["c.safetensors"]);
    store.delete_prefix("updates/8").await.unwrap();
    store.delete("models/t-1/0.safetensors").await.unwrap();
    store.delete("models/t-1/0.safetensors").await.unwrap();
    assert_eq!(store.list("models/t-1").await.unwrap(), ["1.safetensors"]);

    // A conditional put writes only where nothing is, and of writers racing for one key exactly one
    // wins (replicas accepting the same retried upload at once); the loser leaves the blob alone.
    assert!(
        store
            .put_new("updates/9/x.safetensors", Bytes::from_static(b"x"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .put_new("updates/9/x.safetensors", Bytes::from_static(b"y"))
            .await
            .unwrap()
    );
    assert_eq!(store.get("updates/9/x.safetensors").await.unwrap(), &b"x"[..]);
    let mut racers = tokio::task::JoinSet::new();
    for i in 0..8u8 {
        let store = store.clone();
        racers.spawn(async move {
            let won = store
                .put_new("updates/9/race.safetensors", Bytes::from(vec![i; 1 << 16]))
                .await
                .unwrap();
            (i, won)
        });
    }
    let winners: Vec<u8> = racers
        .join_all()
        .await
        .into_iter()
        .filter_map(|(i, won)| won.then_some(i))
        .collect();
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(
        store.get("updates/9/race.safetensors").await.unwrap(),
        vec![winners[0]; 1 << 16]
    );
    assert_eq!(
        sorted(store.list("updates/9").await.unwrap()),
        ["race.safetensors", "x.safetensors"],
        "no temporary file left behind"
    );
    store.delete_prefix("updates/9").await.unwrap();

    // Files in and out, streamed (FedSubAvg's table snapshots): one under a part, one of several
    // parts with a short last one; sizes in the listing.
    let files = tempfile::tempdir().unwrap();
    for (name, len) in [("small.f32", 1_000usize), ("large.f32", (20 << 20) + 3)] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let from = files.path().join(name);
        std::fs::write(&from, &data).unwrap();
        let key = format!("table-snapshots/t-1/{name}");
        store.put_file(&key, &from).await.unwrap();
        let to = files.path().join(format!("back-{name}"));
        store.get_to_file(&key, &to).await.unwrap();
        assert!(std::fs::read(&to).unwrap() == data, "{name} came back changed");
    }
    let mut sizes = store.list_sizes("table-snapshots/t-1").await.unwrap();
    sizes.sort();
    assert_eq!(
        sizes,
        [
            ("large.f32".to_string(), (20 << 20) + 3),
            ("small.f32".to_string(), 1_000)
        ]
    );
    let missing = store
        .get_to_file("table-snapshots/t-1/none.f32", &files.path().join("none"))
        .await
        .unwrap_err();
    assert_eq!(missing.kind(), std::io::ErrorKind::NotFound, "{missing}");
    store.delete_prefix("table-snapshots/t-1").await.unwrap();
}
