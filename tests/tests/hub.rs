//! The hub client against a loopback server speaking the hub protocol
//! (`mlx_zoo_tests::hub_server`): a fresh download of only the needed files
//! that loads and matches transformers, a cached second run with no network,
//! a connection dropped mid-file, a corrupted body, 404s, a gated
//! repository, and hostile servers and caches (path names in headers,
//! redirects, lying and endless bodies, stalls, planted links).

use mlx_zoo::hub::{Hub, HubError, HubOptions, RepoId, SnapshotSource};
use mlx_zoo_tests::hub_server::{Fault, HubServer, ServedRepo};
use mlx_zoo_tests::{fixture, max_abs_diff, reference, TOLERANCE};
use std::path::Path;

const REPO: &str = "zoo-test/tiny-llama";

/// The sharded llama fixture with a tokenizer and files a model does not
/// need (its reference logits, a README, an ONNX export).
fn served_repo() -> ServedRepo {
    let mut repo = ServedRepo::from_dir(REPO, &fixture("llama-sharded"));
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer/char-128");
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let bytes = std::fs::read(tokenizer.join(file)).expect("tokenizer fixture");
        repo.files.insert(file.into(), bytes);
    }
    repo.files
        .insert("README.md".into(), b"# tiny llama\n".to_vec());
    repo.files.insert("onnx/model.onnx".into(), vec![0; 64]);
    repo
}

fn hub(server: &HubServer, cache: &Path) -> Hub {
    let mut options = HubOptions::new(server.endpoint.clone(), cache);
    options.retries = 2;
    Hub::new(options).expect("hub client")
}

fn downloads(server: &HubServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.contains("/resolve/") && !r.ends_with("bytes=0-0"))
        .count()
}

/// Loads the snapshot and compares its logits with transformers'.
fn assert_loads_and_matches(dir: &Path) {
    let registry = mlx_zoo::registry().expect("registry");
    let mut loaded =
        mlx_zoo::loader::load(&registry, dir, &Default::default()).expect("load snapshot");
    let reference = reference("llama-sharded");
    let logits = loaded
        .model
        .forward(&reference.input_ids, None)
        .expect("forward");
    let logits: Vec<f32> = logits.as_slice().to_vec();
    let diff = max_abs_diff(&logits, &reference.logits);
    assert!(diff < TOLERANCE, "max abs diff {diff}");
}

#[test]
fn fresh_download_fetches_only_needed_files_then_the_cache_serves_offline() {
    let cache = tempfile::tempdir().unwrap();
    let server = HubServer::start(vec![served_repo()]);
    let id = RepoId::parse(REPO).unwrap();
    let snapshot = hub(&server, cache.path())
        .fetch(&id)
        .expect("fresh download");
    assert_eq!(snapshot.source, SnapshotSource::Hub);
    let mut files = snapshot.files.clone();
    files.sort();
    assert_eq!(
        files,
        [
            "config.json",
            "model-00001-of-00004.safetensors",
            "model-00002-of-00004.safetensors",
            "model-00003-of-00004.safetensors",
            "model-00004-of-00004.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    );
    assert_eq!(downloads(&server), 8, "{:#?}", server.requests());
    let expected_bytes: u64 = files
        .iter()
        .map(|f| served_repo().files[f].len() as u64)
        .sum();
    assert_eq!(snapshot.downloaded_bytes, expected_bytes);
    // The standard cache layout, shared with Python's huggingface_hub.
    let repo_dir = cache.path().join("models--zoo-test--tiny-llama");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        snapshot.commit
    );
    assert_eq!(
        snapshot.dir,
        repo_dir.join("snapshots").join(&snapshot.commit)
    );
    assert!(std::fs::symlink_metadata(snapshot.dir.join("config.json"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_loads_and_matches(&snapshot.dir);

    // Online again: everything is cached, only the listing is asked for.
    let again = hub(&server, cache.path()).fetch(&id).expect("cached run");
    assert_eq!(
        (again.downloaded_bytes, again.dir.clone()),
        (0, snapshot.dir.clone())
    );
    assert_eq!(downloads(&server), 8);

    // The hub gone: offline mode never connects; online falls back to the cache.
    drop(server);
    let endpoint_down = closed_endpoint();
    let mut options = HubOptions::new(endpoint_down.clone(), cache.path());
    options.offline = true;
    let offline = Hub::new(options.clone())
        .unwrap()
        .fetch(&id)
        .expect("offline");
    assert_eq!(offline.source, SnapshotSource::Offline);
    assert_eq!(offline.dir, snapshot.dir);
    assert_loads_and_matches(&offline.dir);
    options.offline = false;
    options.retries = 0;
    let fallback = Hub::new(options)
        .unwrap()
        .fetch(&id)
        .expect("fallback to cache");
    assert_eq!(fallback.source, SnapshotSource::CacheAfterConnectionError);
}

#[test]
fn offline_without_a_cached_copy_names_what_is_missing() {
    let cache = tempfile::tempdir().unwrap();
    let mut options = HubOptions::new(closed_endpoint(), cache.path());
    options.offline = true;
    let error = Hub::new(options)
        .unwrap()
        .fetch(&RepoId::parse(REPO).unwrap())
        .unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, HubError::NotCached { .. }), "{message}");
    assert!(
        message.contains("zoo-test/tiny-llama@main") && message.contains("HF_HUB_OFFLINE"),
        "{message}"
    );

    // A cached snapshot missing a shard is not complete.
    let server = HubServer::start(vec![served_repo()]);
    let snapshot = hub(&server, cache.path())
        .fetch(&RepoId::parse(REPO).unwrap())
        .unwrap();
    std::fs::remove_file(snapshot.dir.join("model-00003-of-00004.safetensors")).unwrap();
    let mut options = HubOptions::new(server.endpoint.clone(), cache.path());
    options.offline = true;
    let message = Hub::new(options)
        .unwrap()
        .fetch(&RepoId::parse(REPO).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("missing: model-00003-of-00004.safetensors"),
        "{message}"
    );
}

#[test]
fn a_dropped_connection_resumes_and_the_file_is_intact() {
    let cache = tempfile::tempdir().unwrap();
    let server = HubServer::start(vec![served_repo()]);
    let shard = "model-00002-of-00004.safetensors";
    server.inject(shard, Fault::DropAfter(50_000));
    let snapshot = hub(&server, cache.path())
        .fetch(&RepoId::parse(REPO).unwrap())
        .expect("download resumes");
    assert_eq!(
        std::fs::read(snapshot.dir.join(shard)).unwrap(),
        served_repo().files[shard]
    );
    let resumed = format!("/{shard} bytes=50000-");
    assert!(
        server.requests().iter().any(|r| r.ends_with(&resumed)),
        "no resumed range request: {:#?}",
        server.requests()
    );
    assert_loads_and_matches(&snapshot.dir);
}

#[test]
fn a_connection_dropping_every_time_fails_clearly_and_leaves_no_file_behind() {
    let cache = tempfile::tempdir().unwrap();
    let server = HubServer::start(vec![served_repo()]);
    let shard = "model-00001-of-00004.safetensors";
    for _ in 0..3 {
        server.inject(shard, Fault::DropAfter(10_000));
    }
    let id = RepoId::parse(REPO).unwrap();
    let error = hub(&server, cache.path()).fetch(&id).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, HubError::Connection { .. }), "{message}");
    assert!(
        message.contains(shard) && message.contains("gave up after 2 retries"),
        "{message}"
    );
    let snapshots = cache.path().join("models--zoo-test--tiny-llama/snapshots");
    let cached: Vec<_> = walk(&snapshots)
        .into_iter()
        .filter(|p| p.ends_with(shard))
        .collect();
    assert!(
        cached.is_empty(),
        "a partial shard is in the snapshot: {cached:?}"
    );
    // The next run resumes the partial download and completes it.
    let snapshot = hub(&server, cache.path()).fetch(&id).expect("second run");
    assert_eq!(
        std::fs::read(snapshot.dir.join(shard)).unwrap(),
        served_repo().files[shard]
    );
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.ends_with(&format!("/{shard} bytes=30000-"))),
        "{:#?}",
        server.requests()
    );
}

#[test]
fn a_corrupted_body_is_detected_and_removed() {
    let cache = tempfile::tempdir().unwrap();
    let server = HubServer::start(vec![served_repo()]);
    let shard = "model-00004-of-00004.safetensors";
    server.inject(shard, Fault::Corrupt);
    let id = RepoId::parse(REPO).unwrap();
    let error = hub(&server, cache.path()).fetch(&id).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, HubError::Integrity { .. }), "{message}");
    assert!(
        message.contains(shard) && message.contains("SHA-256"),
        "{message}"
    );
    let repo_dir = cache.path().join("models--zoo-test--tiny-llama");
    assert!(walk(&repo_dir.join("snapshots"))
        .iter()
        .all(|p| !p.ends_with(shard)));
    let snapshot = hub(&server, cache.path())
        .fetch(&id)
        .expect("clean second run");
    assert_loads_and_matches(&snapshot.dir);
}

#[test]
fn missing_repositories_revisions_and_files_are_named() {
    let cache = tempfile::tempdir().unwrap();
    let mut no_weights = served_repo();
    no_weights.name = "zoo-test/no-weights".into();
    no_weights
        .files
        .retain(|name, _| !name.ends_with(".safetensors") || name == "reference.safetensors");
    no_weights.files.remove("reference.safetensors");
    no_weights.files.remove("model.safetensors.index.json");
    let server = HubServer::start(vec![served_repo(), no_weights]);
    let client = hub(&server, cache.path());
    let message = client
        .fetch(&RepoId::parse("zoo-test/nope").unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("repository zoo-test/nope not found on http://127.0.0.1"),
        "{message}"
    );
    assert!(message.contains("HF_TOKEN"), "{message}");
    let message = client
        .fetch(&RepoId::parse(&format!("{REPO}@v9")).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("revision `v9` of zoo-test/tiny-llama not found"),
        "{message}"
    );
    let message = client
        .fetch(&RepoId::parse("zoo-test/no-weights").unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("has no weights") && message.contains("README.md"),
        "{message}"
    );

    // An index naming a shard the repository lacks.
    let mut broken = served_repo();
    broken.name = "zoo-test/broken-index".into();
    broken.files.remove("model-00003-of-00004.safetensors");
    let server = HubServer::start(vec![broken]);
    let message = hub(&server, cache.path())
        .fetch(&RepoId::parse("zoo-test/broken-index").unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(
            "model-00003-of-00004.safetensors (listed by model.safetensors.index.json) not found"
        ),
        "{message}"
    );
}

#[test]
fn a_gated_repository_asks_for_hf_token() {
    let cache = tempfile::tempdir().unwrap();
    let mut gated = served_repo();
    gated.gated_token = Some("hf_secret".into());
    let server = HubServer::start(vec![gated]);
    let id = RepoId::parse(REPO).unwrap();
    let error = hub(&server, cache.path()).fetch(&id).unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(
            error,
            HubError::Unauthorized {
                status: 401,
                gated: true,
                ..
            }
        ),
        "{message}"
    );
    assert!(
        message.contains("set HF_TOKEN") && message.contains("gated"),
        "{message}"
    );

    let mut options = HubOptions::new(server.endpoint.clone(), cache.path());
    options.token = Some("hf_wrong".into());
    let message = Hub::new(options.clone())
        .unwrap()
        .fetch(&id)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("HTTP 403") && message.contains("was refused"),
        "{message}"
    );

    options.token = Some("hf_secret".into());
    let snapshot = Hub::new(options)
        .unwrap()
        .fetch(&id)
        .expect("with the token");
    assert_loads_and_matches(&snapshot.dir);
}

#[test]
fn a_commit_revision_is_fetched_and_found_offline() {
    let cache = tempfile::tempdir().unwrap();
    let repo = served_repo();
    let commit = repo.commit.clone();
    let server = HubServer::start(vec![repo]);
    let id = RepoId::parse(&format!("{REPO}@{commit}")).unwrap();
    let snapshot = hub(&server, cache.path()).fetch(&id).expect("by commit");
    assert_eq!(snapshot.commit, commit);
    let refs = cache.path().join("models--zoo-test--tiny-llama/refs");
    assert!(
        walk(&refs).is_empty(),
        "a commit is not a ref: {:?}",
        walk(&refs)
    );
    let mut options = HubOptions::new(server.endpoint.clone(), cache.path());
    options.offline = true;
    let offline = Hub::new(options)
        .unwrap()
        .fetch(&id)
        .expect("offline by commit");
    assert_eq!(offline.dir, snapshot.dir);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(walk(&path));
            } else {
                found.push(path);
            }
        }
    }
    found
}

/// An endpoint nothing listens on.
fn closed_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// Every regular file and link under `dir` (links not followed).
fn entries(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    if let Ok(read) = std::fs::read_dir(dir) {
        for entry in read.flatten() {
            let path = entry.path();
            match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => found.extend(entries(&path)),
                Ok(_) => found.push(path),
                Err(_) => {}
            }
        }
    }
    found
}

/// A cache folder inside a parent whose other entries a hostile server
/// must never reach: returns (parent, cache).
fn fenced_cache() -> (tempfile::TempDir, std::path::PathBuf) {
    let parent = tempfile::tempdir().unwrap();
    let cache = parent.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::write(parent.path().join("precious.txt"), b"keep me").unwrap();
    (parent, cache)
}

/// Nothing was written beside the cache, and `precious.txt` is intact.
fn assert_fence_holds(parent: &Path) {
    let outside: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut outside = outside;
    outside.sort();
    assert_eq!(
        outside,
        ["cache", "precious.txt"],
        "written outside the cache"
    );
    assert_eq!(
        std::fs::read(parent.join("precious.txt")).unwrap(),
        b"keep me"
    );
}

/// Hostile names: an `ETag` or `X-Repo-Commit` that is a path is refused by
/// name before anything is written under it, and no file appears outside
/// the cache.
#[test]
fn hostile_etags_and_commits_never_become_paths() {
    let shard = "model-00001-of-00004.safetensors";
    let id = RepoId::parse(REPO).unwrap();
    for (fault, expect) in [
        (
            Fault::Etag("../../../../precious.txt".into()),
            "not a blob hash",
        ),
        (Fault::Etag("a/b".into()), "not a blob hash"),
        (
            Fault::Etag("c".repeat(64)),
            "not the blob the listing names",
        ),
        (
            Fault::Commit("../../evil".into()),
            "changed during the download",
        ),
    ] {
        let (parent, cache) = fenced_cache();
        let server = HubServer::start(vec![served_repo()]);
        server.inject(shard, fault.clone());
        let error = hub(&server, &cache).fetch(&id).unwrap_err();
        let message = error.to_string();
        assert!(message.contains(expect), "{fault:?}: {message}");
        assert!(
            message.contains(shard) || message.contains("evil"),
            "{message}"
        );
        assert_fence_holds(parent.path());
        let blobs = cache.join("models--zoo-test--tiny-llama/blobs");
        assert!(
            entries(&blobs).iter().all(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.trim_end_matches(".part")
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit())
            }),
            "{fault:?}: {:?}",
            entries(&blobs)
        );
    }
}

/// A redirect with no `Location` is a clear error; a redirect to another
/// host is followed without the token (which only the endpoint receives).
#[test]
fn redirects_are_checked_and_the_token_stays_home() {
    let shard = "model-00002-of-00004.safetensors";
    let id = RepoId::parse(REPO).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let server = HubServer::start(vec![served_repo()]);
    server.inject(shard, Fault::RedirectWithoutLocation);
    let error = hub(&server, cache.path()).fetch(&id).unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, HubError::Protocol { .. }) && message.contains("without a Location"),
        "{message}"
    );

    let cdn = HubServer::start(vec![served_repo()]);
    let server = HubServer::start(vec![served_repo()]);
    server.inject(
        shard,
        Fault::RedirectTo(format!("{}/{REPO}/resolve/main/{shard}", cdn.endpoint)),
    );
    let mut options = HubOptions::new(server.endpoint.clone(), cache.path());
    options.token = Some("hf_secret".into());
    let snapshot = Hub::new(options).unwrap().fetch(&id).expect("redirected");
    assert_eq!(
        std::fs::read(snapshot.dir.join(shard)).unwrap(),
        served_repo().files[shard]
    );
    assert!(
        server
            .requests()
            .iter()
            .all(|r| r.ends_with("[authorization]")),
        "the endpoint got every request with the token: {:#?}",
        server.requests()
    );
    let cdn_requests = cdn.requests();
    assert!(
        !cdn_requests.is_empty() && cdn_requests.iter().all(|r| !r.contains("authorization")),
        "the other host received the token: {cdn_requests:#?}"
    );
}

/// Sizes that lie and bodies that never end stop at the listed size with an
/// error naming the file, leaving no partial blob; a stalled server times
/// out instead of hanging.
#[test]
fn long_endless_and_stalled_bodies_are_bounded() {
    let shard = "model-00003-of-00004.safetensors";
    let id = RepoId::parse(REPO).unwrap();
    for fault in [Fault::Longer(1000), Fault::Endless] {
        let cache = tempfile::tempdir().unwrap();
        let server = HubServer::start(vec![served_repo()]);
        server.inject(shard, fault.clone());
        let started = std::time::Instant::now();
        let error = hub(&server, cache.path()).fetch(&id).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, HubError::Protocol { .. })
                && message.contains(shard)
                && (message.contains("more than") || message.contains("runs past")),
            "{fault:?}: {message}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        let blobs = cache.path().join("models--zoo-test--tiny-llama/blobs");
        let parts: Vec<_> = entries(&blobs)
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".part"))
            .collect();
        assert!(parts.is_empty(), "{fault:?}: partial blobs kept: {parts:?}");
        // Nothing of the bad body is kept: the next run downloads it whole.
        let snapshot = hub(&server, cache.path()).fetch(&id).expect("clean run");
        assert_loads_and_matches(&snapshot.dir);
    }

    let cache = tempfile::tempdir().unwrap();
    let server = HubServer::start(vec![served_repo()]);
    for _ in 0..3 {
        server.inject(shard, Fault::Stall(std::time::Duration::from_secs(5)));
    }
    let mut options = HubOptions::new(server.endpoint.clone(), cache.path());
    options.retries = 2;
    options.timeout = std::time::Duration::from_millis(300);
    let started = std::time::Instant::now();
    let error = Hub::new(options).unwrap().fetch(&id).unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, HubError::Connection { .. }) && message.contains("gave up after 2 retries"),
        "{message}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

/// Links planted in the cache: a `blobs` folder linking elsewhere is
/// refused, and a damaged snapshot entry linking to a file outside the cache
/// is unlinked and downloaded again without touching that file; offline,
/// such an entry does not count as cached.
#[cfg(unix)]
#[test]
fn planted_links_never_lead_outside_the_cache() {
    let id = RepoId::parse(REPO).unwrap();
    let (parent, cache) = fenced_cache();
    let server = HubServer::start(vec![served_repo()]);
    let repo_dir = cache.join("models--zoo-test--tiny-llama");
    std::fs::create_dir_all(&repo_dir).unwrap();
    let elsewhere = parent.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, repo_dir.join("blobs")).unwrap();
    let message = hub(&server, &cache).fetch(&id).unwrap_err().to_string();
    assert!(
        message.contains("symbolic link") && message.contains("blobs"),
        "{message}"
    );
    assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none());
    std::fs::remove_file(repo_dir.join("blobs")).unwrap();
    std::fs::remove_dir(&elsewhere).unwrap();

    // A complete download, then config.json replaced by a link to a file
    // outside the cache.
    let snapshot = hub(&server, &cache).fetch(&id).expect("download");
    let config = snapshot.dir.join("config.json");
    std::fs::remove_file(&config).unwrap();
    std::os::unix::fs::symlink(parent.path().join("precious.txt"), &config).unwrap();
    let mut options = HubOptions::new(server.endpoint.clone(), &cache);
    options.offline = true;
    let message = Hub::new(options)
        .unwrap()
        .fetch(&id)
        .unwrap_err()
        .to_string();
    assert!(message.contains("config.json"), "{message}");
    let snapshot = hub(&server, &cache).fetch(&id).expect("repaired");
    assert_fence_holds(parent.path());
    assert!(std::fs::canonicalize(snapshot.dir.join("config.json"))
        .unwrap()
        .starts_with(std::fs::canonicalize(repo_dir.join("blobs")).unwrap()));
    assert_loads_and_matches(&snapshot.dir);
}
