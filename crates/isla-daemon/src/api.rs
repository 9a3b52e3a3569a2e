//! The routes (`/v1/...`, `/metrics`), the request body of `POST /v1/instances`, the mapping of
//! manager errors to HTTP statuses and the bearer-token check of the TCP listener.
//!
//! Errors are JSON `{"error": "..."}`: 400 for bad input (the message names the field or
//! parameter), 404 for an unknown instance, 409 for a name clash or an operation the instance's
//! state does not allow, 401 without the token, 500 otherwise.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use isla_core::{model, Instance, InstanceSpec, Kind, Manager};
use serde::Deserialize;
use serde_json::json;

use crate::State;

/// An error answer: status and message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    msg: String,
}

impl ApiError {
    fn bad(msg: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, msg: msg.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.msg }))).into_response()
    }
}

impl From<isla_core::Error> for ApiError {
    fn from(e: isla_core::Error) -> ApiError {
        use isla_core::Error as E;
        let status = match &e {
            E::Invalid { .. } | E::Ambiguous(_) | E::Unsupported(_) => StatusCode::BAD_REQUEST,
            E::Image(isla_image::Error::NotFound(_) | isla_image::Error::Invalid { .. }) => StatusCode::BAD_REQUEST,
            E::NotFound(_) => StatusCode::NOT_FOUND,
            E::NameInUse(_) | E::State { .. } => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError { status, msg: e.to_string() }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs `f` with a freshly opened manager on the blocking pool (the manager is blocking). The
/// open repairs what crashed commands left, as every CLI command does. `f` owns the manager
/// (a followed log keeps it).
async fn with_manager<T: Send + 'static>(
    st: &State,
    f: impl FnOnce(Manager) -> isla_core::Result<T> + Send + 'static,
) -> ApiResult<T> {
    let (root, helper) = (st.root.clone(), st.helper.clone());
    tokio::task::spawn_blocking(move || {
        let m = Manager::open_with_helper(&root, helper)?;
        m.reconcile()?;
        f(m)
    })
    .await
    .map_err(|e| ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, msg: format!("request task failed: {e}") })?
    .map_err(ApiError::from)
}

/// The body of `POST /v1/instances`: the CLI's `run -d` flags as JSON. Strings use the CLI's
/// syntax (`ports: ["8080:80"]`, `volumes: ["/h:/g:ro"]`, `memory: "64m"` or a byte count).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CreateBody {
    /// Name (default: `i-` and the short id).
    pub name: Option<String>,
    /// `container` (default), `microvm` or `vm`.
    pub kind: Option<Kind>,
    /// Image (`busybox`, `kit`, ...).
    pub image: Option<String>,
    /// Command and arguments.
    pub command: Vec<String>,
    /// `KEY=VALUE` settings.
    pub env: Vec<String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// Published ports, `-p` syntax.
    pub ports: Vec<String>,
    /// Mounts, `-v` syntax: host directories or named volumes.
    pub volumes: Vec<String>,
    /// CPU limit.
    pub cpus: Option<f64>,
    /// Memory limit: bytes, or a size like `64m`.
    pub memory: Option<serde_json::Value>,
    /// Restart policy, `--restart` syntax.
    pub restart: Option<String>,
    /// Network (`none` for none).
    pub network: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Remove the instance when it exits.
    pub auto_remove: bool,
    /// microVM/VM kernel.
    pub kernel: Option<PathBuf>,
    /// microVM/VM root file system image.
    pub rootfs: Option<PathBuf>,
    /// Start it (default true); false only creates it.
    pub start: Option<bool>,
}

/// Parses a JSON body; the error names the field (`cpus: invalid type ...`).
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            ApiError::bad(format!("request body: {inner}"))
        } else {
            ApiError::bad(format!("request body field `{path}`: {inner}"))
        }
    })
}

impl CreateBody {
    /// The manager's spec; errors name the JSON field.
    pub fn spec(&self) -> ApiResult<InstanceSpec> {
        let field = |f: &str, e: &dyn std::fmt::Display| ApiError::bad(format!("field `{f}`: {e}"));
        let kind = self.kind.unwrap_or(Kind::Container);
        let mut s = InstanceSpec::container(self.name.clone().unwrap_or_default(), String::new());
        s.kind = kind;
        s.image = self.image.clone();
        s.command = self.command.clone();
        s.env = self.env.clone();
        s.workdir = self.workdir.clone();
        for (i, p) in self.ports.iter().enumerate() {
            s.ports.push(p.parse().map_err(|e| field(&format!("ports[{i}]"), &e))?);
        }
        for (i, v) in self.volumes.iter().enumerate() {
            s.volumes.push(v.parse().map_err(|e| field(&format!("volumes[{i}]"), &e))?);
        }
        if let Some(c) = self.cpus {
            if !(c.is_finite() && c > 0.0) {
                return Err(field("cpus", &format!("{c}: expected a number of CPUs above 0, e.g. 0.5")));
            }
            s.cpus = Some(c);
        }
        s.memory = match &self.memory {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(n)) => Some(
                n.as_u64()
                    .filter(|&b| b > 0)
                    .ok_or_else(|| field("memory", &format!("{n}: expected a byte count above 0")))?,
            ),
            Some(serde_json::Value::String(t)) => Some(model::parse_memory(t).map_err(|e| field("memory", &e))?),
            Some(other) => return Err(field("memory", &format!("{other}: expected bytes or a size like \"64m\""))),
        };
        if let Some(r) = &self.restart {
            s.restart = r.parse().map_err(|e| field("restart", &e))?;
        }
        s.network = self.network.clone();
        s.labels = self.labels.clone();
        s.auto_remove = self.auto_remove;
        s.kernel = self.kernel.clone();
        s.rootfs = self.rootfs.clone();
        Ok(s)
    }
}

/// A yes/no query parameter: `1`, `true`, `yes`, `0`, `false`, `no`, or absent (false).
fn flag(q: &HashMap<String, String>, name: &str) -> ApiResult<bool> {
    match q.get(name).map(String::as_str) {
        None | Some("0" | "false" | "no") => Ok(false),
        Some("" | "1" | "true" | "yes") => Ok(true),
        Some(v) => Err(ApiError::bad(format!("query parameter `{name}`: `{v}` is not 1/true or 0/false"))),
    }
}

/// A number query parameter.
fn number(q: &HashMap<String, String>, name: &str) -> ApiResult<Option<u64>> {
    q.get(name)
        .map(|v| v.parse().map_err(|_| ApiError::bad(format!("query parameter `{name}`: `{v}` is not a number"))))
        .transpose()
}

async fn list(
    axum::extract::State(st): axum::extract::State<State>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Vec<Instance>>> {
    let all = flag(&q, "all")?;
    Ok(Json(with_manager(&st, move |m| m.list(all)).await?))
}

async fn create(axum::extract::State(st): axum::extract::State<State>, body: Bytes) -> ApiResult<Response> {
    let req: CreateBody = parse_body(&body)?;
    let spec = req.spec()?;
    let start = req.start.unwrap_or(true);
    let reaper = st.reaper.clone();
    let inst = with_manager(&st, move |m| {
        if !start {
            return m.create(spec);
        }
        m.run(spec, false).map(|s| reaper.adopt(s))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(inst)).into_response())
}

async fn inspect(
    axum::extract::State(st): axum::extract::State<State>,
    Path(name): Path<String>,
) -> ApiResult<Json<Instance>> {
    Ok(Json(with_manager(&st, move |m| m.get(&name)).await?))
}

async fn remove(
    axum::extract::State(st): axum::extract::State<State>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Instance>> {
    let force = flag(&q, "force")?;
    Ok(Json(with_manager(&st, move |m| m.remove(&name, force)).await?))
}

async fn action(
    axum::extract::State(st): axum::extract::State<State>,
    Path((name, action)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Instance>> {
    let timeout = Duration::from_secs(number(&q, "t")?.unwrap_or(10));
    let reaper = st.reaper.clone();
    let keep = move |s| reaper.adopt(s);
    let inst = match action.as_str() {
        "start" => with_manager(&st, move |m| m.start(&name, false).map(keep)).await?,
        "restart" => with_manager(&st, move |m| m.restart(&name, timeout).map(keep)).await?,
        "stop" => with_manager(&st, move |m| m.stop(&name, timeout)).await?,
        "pause" => with_manager(&st, move |m| m.pause(&name)).await?,
        "resume" | "unpause" => with_manager(&st, move |m| m.resume(&name)).await?,
        "kill" => {
            let sig = q.get("signal").map_or("KILL", String::as_str);
            let sig = isla_container::parse_signal(sig)
                .map_err(|e| ApiError::bad(format!("query parameter `signal`: {e}")))?;
            with_manager(&st, move |m| m.kill(&name, sig).and_then(|()| m.get(&name))).await?
        }
        other => {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                msg: format!("no action `{other}`: use start, stop, restart, kill, pause or resume"),
            })
        }
    };
    Ok(Json(inst))
}

/// A log record as JSON (`text` with invalid UTF-8 replaced).
fn record_json(r: &isla_core::logs::Record) -> serde_json::Value {
    json!({
        "time": r.time,
        "stream": match r.stream { isla_core::logs::Stream::Stdout => "stdout", isla_core::logs::Stream::Stderr => "stderr" },
        "partial": !r.full,
        "text": String::from_utf8_lossy(&r.text),
    })
}

/// The log as a JSON array; with `follow=1`, NDJSON records streamed (chunked) until the
/// instance ends, is removed, the client goes or the daemon stops.
async fn logs(
    axum::extract::State(st): axum::extract::State<State>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let tail = number(&q, "tail")?.map(|n| n as usize);
    if !flag(&q, "follow")? {
        let recs = with_manager(&st, move |m| m.logs(&name, tail)).await?;
        return Ok(Json(recs.iter().map(record_json).collect::<Vec<_>>()).into_response());
    }
    // The first part (and an unknown instance's 404) before the stream starts.
    let (m, id, first, offset) = with_manager(&st, move |m| {
        let id = m.get(&name)?.id;
        let (mut recs, offset) = m.logs_from(&id, 0)?;
        if let Some(n) = tail {
            recs.drain(..isla_core::logs::tail_start(&recs, n));
        }
        Ok((m, id, recs, offset))
    })
    .await?;
    let follow = Follow { m: Some(m), id, offset, first: Some(ndjson(&first)), done: false, stop: st.shutdown.clone() };
    let stream = futures_util::stream::unfold(follow, |mut f| async move {
        f.next().await.map(|b| (Ok::<_, std::convert::Infallible>(b), f))
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response())
}

/// Records as NDJSON lines.
fn ndjson(recs: &[isla_core::logs::Record]) -> Bytes {
    Bytes::from(recs.iter().map(|r| record_json(r).to_string() + "\n").collect::<String>())
}

/// A followed log: what the file gains is read every 200 ms (on the blocking pool, holding no
/// thread in between) until the instance is no longer running or paused (its last lines
/// included), is removed, or the daemon stops. A client that goes away drops the stream.
struct Follow {
    /// The manager, moved into each blocking read and back.
    m: Option<Manager>,
    id: String,
    offset: u64,
    first: Option<Bytes>,
    done: bool,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Follow {
    /// The next chunk, or None at the end.
    async fn next(&mut self) -> Option<Bytes> {
        if let Some(b) = self.first.take() {
            return Some(b);
        }
        loop {
            if self.done || *self.stop.borrow() {
                return None;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = self.stop.changed() => return None,
            }
            let (m, id, offset) = (self.m.take()?, self.id.clone(), self.offset);
            let (m, read) = tokio::task::spawn_blocking(move || {
                // Status first, then the log: the last output of an instance that just ended
                // is read.
                let active = m.get(&id).map(|i| i.status.is_active());
                let read = active.and_then(|a| Ok((a, m.logs_from(&id, offset)?)));
                (m, read)
            })
            .await
            .ok()?;
            self.m = Some(m);
            let (active, (recs, next)) = read.ok()?;
            self.offset = next;
            self.done = !active;
            if !recs.is_empty() {
                return Some(ndjson(&recs));
            }
        }
    }
}

/// The body of `POST /v1/instances/{name}/exec`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecBody {
    /// Program and arguments (required).
    pub command: Vec<String>,
    /// `KEY=VALUE` settings.
    pub env: Vec<String>,
    /// Working directory (containers only).
    pub workdir: Option<String>,
}

/// Runs a command in a running instance: `{"exit_code", "stdout", "stderr"}`.
async fn exec(
    axum::extract::State(st): axum::extract::State<State>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<isla_core::ExecOutput>> {
    let b: ExecBody = parse_body(&body)?;
    if b.command.is_empty() {
        return Err(ApiError::bad("field `command`: give the program and its arguments, e.g. [\"ls\", \"/\"]"));
    }
    let req = isla_core::ExecRequest { args: b.command, env: b.env, workdir: b.workdir, tty: false };
    Ok(Json(with_manager(&st, move |m| m.exec_output(&name, &req)).await?))
}

async fn stats(
    axum::extract::State(st): axum::extract::State<State>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let (inst, s) = with_manager(&st, move |m| m.stats(&name)).await?;
    Ok(Json(json!({
        "id": inst.id,
        "name": inst.spec.name,
        "cpu_ns": s.cpu_ns,
        "memory": s.memory,
        "memory_limit": s.memory_limit,
        "pids": s.pids,
    })))
}

/// Newline-delimited JSON events until the client goes away or the daemon stops.
async fn events(axum::extract::State(st): axum::extract::State<State>) -> Response {
    let rx = st.events.subscribe();
    let stop = st.shutdown.clone();
    let stream = futures_util::stream::unfold((rx, stop), |(mut rx, mut stop)| async move {
        let line = tokio::select! {
            r = rx.recv() => match r {
                Ok(line) => line,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => json!({"type": "lagged", "missed": n}).to_string(),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            },
            _ = stop.wait_for(|s| *s) => return None,
        };
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(line + "\n")), (rx, stop)))
    });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response()
}

async fn metrics(axum::extract::State(st): axum::extract::State<State>) -> ApiResult<Response> {
    let text = with_manager(&st, |m| crate::metrics::render(&m)).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

async fn version() -> Json<serde_json::Value> {
    Json(json!({ "version": env!("CARGO_PKG_VERSION"), "api": "v1" }))
}

async fn not_found() -> ApiError {
    ApiError { status: StatusCode::NOT_FOUND, msg: "no such endpoint (see docs/daemon.md)".into() }
}

/// Every route, on `state`.
pub fn router(state: State) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/instances", get(list).post(create))
        .route("/v1/instances/{name}", get(inspect).delete(remove))
        .route("/v1/instances/{name}/logs", get(logs))
        .route("/v1/instances/{name}/stats", get(stats))
        .route("/v1/instances/{name}/exec", post(exec))
        .route("/v1/instances/{name}/{action}", post(action))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// Byte comparison whose time does not depend on where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The TCP listener's guard: `Authorization: Bearer <token>` or 401.
pub async fn require_token(
    axum::extract::State(token): axum::extract::State<Arc<String>>,
    req: Request,
    next: Next,
) -> Response {
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if same(t.trim().as_bytes(), token.as_bytes()) => next.run(req).await,
        _ => {
            let mut r = ApiError {
                status: StatusCode::UNAUTHORIZED,
                msg: "this TCP endpoint needs `Authorization: Bearer <token>` (the daemon's --token-file)".into(),
            }
            .into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> String {
        match parse_body::<CreateBody>(body.as_bytes()).and_then(|b| b.spec()) {
            Ok(s) => panic!("{body} was accepted: {s:?}"),
            Err(e) => {
                assert_eq!(e.status, StatusCode::BAD_REQUEST);
                e.msg
            }
        }
    }

    #[test]
    fn bad_bodies_name_the_field() {
        assert!(err(r#"{"name": "a", "imagee": "busybox"}"#).contains("unknown field `imagee`"));
        assert!(err(r#"{"name": "a", "cpus": "two"}"#).contains("field `cpus`"));
        assert!(err(r#"{"command": "ls"}"#).contains("field `command`"));
        assert!(err(r#"{"kind": "zone"}"#).contains("field `kind`"));
        assert!(err(r#"{"name": "a""#).contains("request body"));
        assert!(err(r#"{"ports": ["80:80", "x"]}"#).contains("field `ports[1]`"));
        assert!(err(r#"{"volumes": ["rel/x:/x"]}"#).contains("field `volumes[0]`"));
        assert!(err(r#"{"memory": "lots"}"#).contains("field `memory`"));
        assert!(err(r#"{"memory": -1}"#).contains("field `memory`"));
        assert!(err(r#"{"cpus": 0}"#).contains("field `cpus`"));
        assert!(err(r#"{"restart": "sometimes"}"#).contains("field `restart`"));
    }

    #[test]
    fn a_good_body_becomes_the_cli_spec() {
        let b: CreateBody = parse_body(
            br#"{"name":"web","image":"busybox","command":["httpd","-f"],"ports":["8080:80"],
                 "volumes":["/srv:/www:ro"],"memory":"64m","cpus":0.5,"restart":"on-failure:2",
                 "env":["A=1"],"network":"none","labels":{"k":"v"}}"#,
        )
        .unwrap();
        let s = b.spec().unwrap();
        assert_eq!((s.name.as_str(), s.image.as_deref(), s.kind), ("web", Some("busybox"), Kind::Container));
        assert_eq!(s.memory, Some(64 << 20));
        assert_eq!(s.cpus, Some(0.5));
        assert_eq!(s.ports.len(), 1);
        assert_eq!(s.ports[0].host_port, 8080);
        assert!(s.volumes[0].readonly);
        assert_eq!(s.restart, "on-failure:2".parse().unwrap());
        assert_eq!(s.labels.get("k").map(String::as_str), Some("v"));
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert!(!same(b"", b"a"));
    }
}
