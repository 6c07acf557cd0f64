//! One owner per state directory and run database.
//!
//! `serve` takes an exclusive advisory lock (`flock`) on a lock file in the state directory and
//! on one beside the run database (by their real paths), before it opens a store or touches a
//! run. A second server on the same directory or database is refused with
//! the first one's pid and address, so it can never requeue the live server's runs as its own
//! "previous life". The kernel drops the lock when the process dies (even by SIGKILL), so a
//! stale file never blocks a restart, and whoever holds the lock knows that every run leased
//! under this node's name by another incarnation belongs to a process that is gone.
//!
//! `agentry keys` does not take the lock: keys are rows of their own that a running server
//! reads, and creating one while it serves is the normal case.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Held for the life of the application; released when dropped (or when the process dies).
pub struct StateLock {
    files: Vec<(PathBuf, File)>,
    /// The run database itself, `flock`ed too: a hard link is another path to the same file,
    /// which no lock file beside a path can see. (SQLite's own locks are `fcntl` locks, which
    /// on Linux are independent of `flock`.)
    _database: Option<File>,
}

impl StateLock {
    /// Locks `<state_dir>/agentry.lock` and `<runs_db>.lock`, both by their real paths
    /// (symlinks and `..` resolved, so that no spelling of a path escapes the lock). Fails,
    /// naming the holder, if another process has either.
    pub fn acquire(state_dir: &Path, runs_db: Option<&Path>) -> anyhow::Result<Self> {
        let mut paths = vec![real_path(&state_dir.join("agentry.lock"))?];
        if let Some(runs_db) = runs_db {
            let db_lock = lock_path_of(&real_path(runs_db)?);
            if !paths.contains(&db_lock) {
                paths.push(db_lock);
            }
        }
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("cannot open the lock file {}", path.display()))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = holder.trim();
                    let holder = if holder.is_empty() {
                        "another process".to_string()
                    } else {
                        format!("another agentry ({holder})")
                    };
                    bail!(
                        "{holder} already serves from {}: refusing to start a second server on the same state directory or database (it would take over the first one's runs). Stop it first, or give this one its own --state-dir",
                        path.parent().unwrap_or(&path).display()
                    );
                }
                Err(TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("cannot lock {}", path.display()));
                }
            }
            files.push((path, file));
        }
        let database = match runs_db {
            Some(runs_db) => Some(lock_database_file(runs_db)?),
            None => None,
        };
        let mut lock = Self {
            files,
            _database: database,
        };
        lock.describe(&format!("pid {}", std::process::id()));
        Ok(lock)
    }

    /// Records where this server listens, for the message a second one prints.
    pub fn record_address(&mut self, addr: SocketAddr) {
        self.describe(&format!(
            "pid {}, listening on http://{addr}",
            std::process::id()
        ));
    }

    /// Rewrites the holder's description in every lock file. Best effort: the lock itself is
    /// what matters, the text only makes the refusal clearer.
    fn describe(&mut self, text: &str) {
        for (path, file) in &mut self.files {
            let written = file
                .set_len(0)
                .and_then(|_| file.rewind())
                .and_then(|_| file.write_all(text.as_bytes()))
                .and_then(|_| file.flush());
            if let Err(e) = written {
                tracing::debug!("cannot describe the lock holder in {}: {e}", path.display());
            }
        }
    }
}

/// `path` with its directory created and every symlink and `..` resolved; the file itself is
/// resolved too when it exists (a symlinked database locks the file it points to).
fn real_path(path: &Path) -> anyhow::Result<PathBuf> {
    if let Ok(real) = std::fs::canonicalize(path) {
        return Ok(real);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir =
        std::fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    Ok(match path.file_name() {
        Some(name) => dir.join(name),
        None => dir,
    })
}

fn lock_path_of(db: &Path) -> PathBuf {
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    db.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_database_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("agentry.db");
        let mut first = StateLock::acquire(dir.path(), Some(&db)).expect("the first lock");
        first.record_address("127.0.0.1:4321".parse().expect("addr"));
        let err = StateLock::acquire(dir.path(), Some(&db))
            .err()
            .expect("a second lock is refused")
            .to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains("127.0.0.1:4321"), "{err}");
        // Another state directory over the same database is refused too, and so is the same
        // state directory with its database elsewhere, and a database reached by a symlink.
        let other = tempfile::tempdir().expect("tempdir");
        assert!(StateLock::acquire(other.path(), Some(&db)).is_err());
        assert!(StateLock::acquire(dir.path(), Some(&other.path().join("x.db"))).is_err());
        std::fs::write(&db, b"").expect("db");
        let link = other.path().join("link.db");
        std::os::unix::fs::symlink(&db, &link).expect("symlink");
        assert!(StateLock::acquire(other.path(), Some(&link)).is_err());
        // A hard link: another name for the same file, in another directory.
        let hard = other.path().join("hard.db");
        std::fs::hard_link(&db, &hard).expect("hard link");
        let third = tempfile::tempdir().expect("tempdir");
        assert!(StateLock::acquire(third.path(), Some(&hard)).is_err());
        let dotted = other
            .path()
            .join("..")
            .join(dir.path().file_name().expect("name"))
            .join("agentry.db");
        assert!(StateLock::acquire(other.path(), Some(&dotted)).is_err());
        drop(first);
        StateLock::acquire(dir.path(), Some(&db)).expect("free again once the holder is gone");
    }
}

/// Locks the SQLite file itself, so that a second path to it (a hard link) is refused too.
fn lock_database_file(runs_db: &Path) -> anyhow::Result<std::fs::File> {
    let db_path = real_path(runs_db)?;
    let database = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&db_path)
        .with_context(|| format!("cannot open the run database {}", db_path.display()))?;
    match database.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => bail!(
            "another process serves from the run database {} (through another path to it, such as a hard link): refusing to start a second server on it",
            db_path.display()
        ),
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", db_path.display()));
        }
    }
    Ok(database)
}
