//! A loopback server speaking the part of the Hugging Face hub protocol the
//! hub client uses, so downloads are tested without a network:
//! `GET /api/models/{repo}/revision/{rev}` (the file listing, with sizes and
//! LFS hashes) and `GET /{repo}/resolve/{rev}/{file}` (with `Range`,
//! `ETag` and `X-Repo-Commit`). Faults are injected on request: a connection
//! dropped mid-file, a corrupted body, a gated repository answering 401, and
//! hostile answers (names that are paths, redirects without a target or to
//! another host, bodies longer than listed or endless, a stalled server).

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A repository the server hosts.
#[derive(Clone)]
pub struct ServedRepo {
    /// `org/name`.
    pub name: String,
    /// The commit its `main` branch points at.
    pub commit: String,
    /// Files by path.
    pub files: BTreeMap<String, Vec<u8>>,
    /// When set, requests need `Authorization: Bearer <token>` (a gated
    /// repository): 401 without a token, 403 with another one.
    pub gated_token: Option<String>,
}

impl ServedRepo {
    /// A repository holding every file of `dir` (not recursive).
    pub fn from_dir(name: &str, dir: &Path) -> Self {
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir).expect("fixture directory") {
            let path = entry.expect("entry").path();
            if path.is_file() {
                let name = path
                    .file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned();
                files.insert(name, std::fs::read(&path).expect("fixture file"));
            }
        }
        let commit = hex(&Sha256::digest(name.as_bytes()))[..40].to_string();
        Self {
            name: name.to_string(),
            commit,
            files,
            gated_token: None,
        }
    }
}

/// A fault applied to the next download of one file.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Announce the whole body, send this many bytes, close the connection.
    DropAfter(usize),
    /// Send the whole body with one byte flipped.
    Corrupt,
    /// Answer with this `ETag` (quoted as given).
    Etag(String),
    /// Answer with this `X-Repo-Commit`.
    Commit(String),
    /// Answer `302 Found` with no `Location`.
    RedirectWithoutLocation,
    /// Answer `302 Found` to this URL (with the hub's `ETag` and commit).
    RedirectTo(String),
    /// Send the body followed by this many more bytes (sizes that lie).
    Longer(usize),
    /// Send headers without a length, then bytes until the client leaves.
    Endless,
    /// Send the headers, then nothing for this long.
    Stall(std::time::Duration),
}

#[derive(Default)]
struct State {
    repos: Vec<ServedRepo>,
    faults: BTreeMap<String, Vec<Fault>>,
    log: Vec<String>,
}

/// The running server; stops when dropped.
pub struct HubServer {
    /// `http://127.0.0.1:<port>`, for `HF_ENDPOINT`.
    pub endpoint: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    port: u16,
    thread: Option<JoinHandle<()>>,
}

impl HubServer {
    /// Starts serving `repos` on a free loopback port.
    pub fn start(repos: Vec<ServedRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let port = listener.local_addr().expect("address").port();
        let state = Arc::new(Mutex::new(State {
            repos,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let state = state.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        let state = state.clone();
                        std::thread::spawn(move || serve(stream, &state));
                    }
                }
            })
        };
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            state,
            stop,
            port,
            thread: Some(thread),
        }
    }

    /// Applies `fault` to the next download (not the 1-byte metadata probe)
    /// of `file` in any repository.
    pub fn inject(&self, file: &str, fault: Fault) {
        let mut state = self.state.lock().expect("state");
        state
            .faults
            .entry(file.to_string())
            .or_default()
            .push(fault);
    }

    /// Every request so far, as `GET <path> [<range>]`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().expect("state").log.clone()
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_lfs(file: &str) -> bool {
    [".safetensors", ".bin", ".npz"]
        .iter()
        .any(|s| file.ends_with(s))
}

struct Request {
    path: String,
    headers: BTreeMap<String, String>,
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let _method = parts.next()?;
    let target = parts.next()?.to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let path = target.split('?').next().unwrap_or_default().to_string();
    Some(Request { path, headers })
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    write_head(stream, status, headers, Some(body.len()));
    let _ = stream.write_all(body);
    let _ = stream.flush();
}

/// Writes a response's head: the status, `Connection: close`, the length
/// when given, and `headers`.
fn write_head(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    length: Option<usize>,
) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    if let Some(length) = length {
        head.push_str(&format!("Content-Length: {length}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
}

fn error(stream: &mut TcpStream, status: &str, code: &str, message: &str) {
    let body = serde_json_string(message);
    respond(
        stream,
        status,
        &[
            ("X-Error-Code", code.to_string()),
            ("X-Error-Message", message.to_string()),
            ("Content-Type", "application/json".into()),
        ],
        format!("{{\"error\":{body}}}").as_bytes(),
    );
}

fn serde_json_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

fn serve(mut stream: TcpStream, state: &Mutex<State>) {
    let Some(request) = read_request(&stream) else {
        return;
    };
    let range = request.headers.get("range").cloned();
    {
        let mut state = state.lock().expect("state");
        let mut entry = match &range {
            Some(range) => format!("GET {} {range}", request.path),
            None => format!("GET {}", request.path),
        };
        if request.headers.contains_key("authorization") {
            entry.push_str(" [authorization]");
        }
        state.log.push(entry);
    }
    let repos = state.lock().expect("state").repos.clone();
    let path = request.path.trim_start_matches('/');
    let (api, rest) = match path.strip_prefix("api/models/") {
        Some(rest) => (true, rest),
        None => (false, path),
    };
    let segments: Vec<&str> = rest.splitn(5, '/').collect();
    if segments.len() < 4 {
        return error(
            &mut stream,
            "404 Not Found",
            "RepoNotFound",
            "Repository not found",
        );
    }
    let name = format!("{}/{}", segments[0], segments[1]);
    let Some(repo) = repos.iter().find(|r| r.name == name) else {
        return error(
            &mut stream,
            "404 Not Found",
            "RepoNotFound",
            "Repository not found",
        );
    };
    if let Some(token) = &repo.gated_token {
        let expected = format!("Bearer {token}");
        match request.headers.get("authorization") {
            None => {
                return error(
                    &mut stream,
                    "401 Unauthorized",
                    "GatedRepo",
                    &format!("Access to model {name} is restricted. You must have access to it and be authenticated to access it. Please log in."),
                )
            }
            Some(sent) if *sent != expected => {
                return error(
                    &mut stream,
                    "403 Forbidden",
                    "GatedRepo",
                    &format!("Access to model {name} is restricted and you are not in the authorized list."),
                )
            }
            Some(_) => {}
        }
    }
    let revision_ok = |rev: &str| rev == "main" || rev == repo.commit;
    if api {
        if segments[2] != "revision" || !revision_ok(segments[3]) {
            return error(
                &mut stream,
                "404 Not Found",
                "RevisionNotFound",
                "Invalid rev id",
            );
        }
        let siblings: Vec<String> = repo
            .files
            .iter()
            .map(|(file, bytes)| {
                let lfs = if is_lfs(file) {
                    format!(
                        ",\"lfs\":{{\"sha256\":\"{}\",\"size\":{},\"pointerSize\":134}}",
                        hex(&Sha256::digest(bytes)),
                        bytes.len()
                    )
                } else {
                    String::new()
                };
                format!(
                    "{{\"rfilename\":{},\"size\":{},\"blobId\":\"{}\"{lfs}}}",
                    serde_json_string(file),
                    bytes.len(),
                    &hex(&Sha256::digest(bytes))[..40]
                )
            })
            .collect();
        let body = format!(
            "{{\"id\":{},\"sha\":\"{}\",\"siblings\":[{}]}}",
            serde_json_string(&name),
            repo.commit,
            siblings.join(",")
        );
        return respond(
            &mut stream,
            "200 OK",
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
        );
    }
    if segments[2] != "resolve" || segments.len() < 5 {
        return error(
            &mut stream,
            "404 Not Found",
            "EntryNotFound",
            "Entry not found",
        );
    }
    if !revision_ok(segments[3]) {
        return error(
            &mut stream,
            "404 Not Found",
            "RevisionNotFound",
            "Invalid rev id",
        );
    }
    let file = segments[4];
    let Some(bytes) = repo.files.get(file) else {
        return error(
            &mut stream,
            "404 Not Found",
            "EntryNotFound",
            &format!("{file} does not exist on \"main\""),
        );
    };
    let total = bytes.len();
    let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(spec) => {
            let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().map(|b: usize| b + 1).unwrap_or(total);
            (a.min(total), b.min(total))
        }
        None => (0, total),
    };
    let etag = if is_lfs(file) {
        hex(&Sha256::digest(bytes))
    } else {
        hex(&Sha256::digest(bytes))[..40].to_string()
    };
    let mut headers = vec![
        ("ETag", format!("\"{etag}\"")),
        ("X-Repo-Commit", repo.commit.clone()),
        ("Accept-Ranges", "bytes".into()),
    ];
    let status = if range.is_some() {
        headers.push((
            "Content-Range",
            format!("bytes {start}-{}/{total}", end.saturating_sub(1)),
        ));
        "206 Partial Content"
    } else {
        "200 OK"
    };
    let mut body = bytes[start..end].to_vec();
    let probe = end - start <= 1;
    let fault = if probe {
        None
    } else {
        let mut state = state.lock().expect("state");
        state
            .faults
            .get_mut(file)
            .and_then(|faults| (!faults.is_empty()).then(|| faults.remove(0)))
    };
    match fault {
        Some(Fault::DropAfter(sent)) => {
            write_head(&mut stream, status, &headers, Some(body.len()));
            let _ = stream.write_all(&body[..sent.min(body.len())]);
            let _ = stream.flush();
            let _ = stream.shutdown(Shutdown::Both);
        }
        Some(Fault::Corrupt) => {
            if let Some(last) = body.last_mut() {
                *last ^= 0xff;
            }
            respond(&mut stream, status, &headers, &body);
        }
        Some(Fault::Etag(etag)) => {
            headers[0] = ("ETag", format!("\"{etag}\""));
            respond(&mut stream, status, &headers, &body);
        }
        Some(Fault::Commit(commit)) => {
            headers[1] = ("X-Repo-Commit", commit);
            respond(&mut stream, status, &headers, &body);
        }
        Some(Fault::RedirectWithoutLocation) => {
            respond(&mut stream, "302 Found", &headers, b"");
        }
        Some(Fault::RedirectTo(url)) => {
            headers.push(("Location", url));
            respond(&mut stream, "302 Found", &headers, b"");
        }
        Some(Fault::Longer(extra)) => {
            body.extend(std::iter::repeat_n(0u8, extra));
            respond(&mut stream, status, &headers, &body);
        }
        Some(Fault::Endless) => {
            write_head(&mut stream, status, &headers, None);
            let chunk = vec![0u8; 1 << 16];
            // Until the client hangs up (a write fails), with a bound so a
            // client that never stops cannot keep the test running forever.
            for _ in 0..(1 << 16) {
                if stream.write_all(&chunk).is_err() {
                    break;
                }
            }
        }
        Some(Fault::Stall(pause)) => {
            write_head(&mut stream, status, &headers, Some(body.len()));
            let _ = stream.flush();
            std::thread::sleep(pause);
        }
        None => respond(&mut stream, status, &headers, &body),
    }
}
