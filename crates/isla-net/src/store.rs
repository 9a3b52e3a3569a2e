//! The state file: `<root>/net/networks.json`, replaced atomically under `<root>/net/lock`.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

use crate::model::State;
use crate::Error;

/// The state directory of one isla root.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    dir: PathBuf,
}

/// A held `flock`; released when dropped (the descriptor closes).
pub(crate) struct Lock(#[allow(dead_code)] File);

impl Store {
    pub(crate) fn open(root: &Path) -> Result<Self, Error> {
        let dir = root.join("net");
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io { path: dir.clone(), source: e })?;
        Ok(Self { dir })
    }

    /// `<root>/net`.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn file(&self) -> PathBuf {
        self.dir.join("networks.json")
    }

    /// Takes the lock, exclusive for changes, shared for reads.
    pub(crate) fn lock(&self, exclusive: bool) -> Result<Lock, Error> {
        let path = self.dir.join("lock");
        let io = |e: std::io::Error| Error::Io { path: path.clone(), source: e };
        let f = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io)?;
        let op = if exclusive { FlockOperation::LockExclusive } else { FlockOperation::LockShared };
        flock(&f, op).map_err(|e| io(e.into()))?;
        Ok(Lock(f))
    }

    /// Reads the state (empty if there is no file yet). Writes are atomic renames, so this is
    /// consistent even without the lock.
    pub(crate) fn load(&self) -> Result<State, Error> {
        let path = self.file();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State { version: 1, ..State::default() }),
            Err(e) => return Err(Error::Io { path, source: e }),
        };
        let state: State =
            serde_json::from_str(&text).map_err(|e| Error::BadState { path: path.clone(), message: e.to_string() })?;
        if state.version != 1 {
            return Err(Error::BadState {
                path,
                message: format!("unknown version {} (this isla reads 1)", state.version),
            });
        }
        Ok(state)
    }

    /// Writes `state`: temporary file, fsync, rename, fsync of the directory.
    pub(crate) fn save(&self, state: &State) -> Result<(), Error> {
        let path = self.file();
        let tmp = self.dir.join("networks.json.tmp");
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |e: std::io::Error| Error::Io { path: p, source: e }
        };
        let text = serde_json::to_vec_pretty(state)
            .map_err(|e| Error::BadState { path: path.clone(), message: e.to_string() })?;
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&text).and_then(|()| f.sync_all()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        Ok(())
    }
}
