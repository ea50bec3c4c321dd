//! The current key and certificate of each local identity, kept across agent restarts
//! so that an agent restarted while the CA is down still serves its pods.
//!
//! Only memory-backed storage private to the agent is used: a directory on tmpfs or
//! ramfs (never a disk), owned by the agent and closed to group and others (0700), one
//! file per identity (0600). Whoever can read it could also read the agent's memory
//! (root on the node); a reboot clears it. A directory that does not meet this is not
//! used: the agent then keeps keys in memory only, as without a cache.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::SystemTime,
};

use rcgen::KeyPair;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    identity::spiffe::spiffe_id, identity::spiffe::TrustBundle,
    identity::workload_certificate::certified, identity::workload_certificate::WorkloadCertificate,
    identity::Identity,
};

/// `statfs` magic numbers of the memory-backed filesystems.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

#[derive(Debug, Error)]
pub enum CertCacheError {
    #[error("cannot use {dir} for workload keys: {source}")]
    Io { dir: PathBuf, source: io::Error },
    #[error("{dir} is not on tmpfs or ramfs (filesystem type {fs_type:#x}): workload keys are never written to a disk; mount a tmpfs there (e.g. an emptyDir with medium: Memory) or pass another --cert-cache-dir")]
    NotInMemory { dir: PathBuf, fs_type: i64 },
    #[error("{dir} is not a directory")]
    NotADirectory { dir: PathBuf },
    #[error("{dir} is open to group or others (mode {mode:o}); workload keys need a directory only the agent can enter: chmod 700 it")]
    Accessible { dir: PathBuf, mode: u32 },
    #[error(
        "{dir} belongs to uid {owner}, not to the agent (uid {agent}); give it to the agent's user"
    )]
    Owner {
        dir: PathBuf,
        owner: u32,
        agent: u32,
    },
}

/// What one identity's file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedCertificate {
    pub identity: String,
    /// PKCS#8 private key, PEM.
    pub key: String,
    /// The certificate chain the CA issued, PEM.
    pub chain: String,
}

impl CachedCertificate {
    /// The key and certificate, if they are still what peers would accept: the
    /// identity's own, valid at `now`, chained to the current root, the key matching.
    pub fn usable(
        &self,
        identity: &Identity,
        trust: &TrustBundle,
        now: SystemTime,
    ) -> Result<(KeyPair, WorkloadCertificate), String> {
        if self.identity != identity.to_string() {
            return Err(format!("the file is for {}", self.identity));
        }
        let key = KeyPair::from_pem(&self.key).map_err(|e| format!("private key: {e}"))?;
        let cert = certified(identity, &key, &self.chain)?;
        let leaf = cert.certified.cert.first().ok_or("no certificate")?;
        let named = spiffe_id(leaf)?;
        if &named != identity {
            return Err(format!("the certificate names {named}"));
        }
        trust
            .verify_workload(&cert.certified.cert)
            .map_err(|e| format!("not accepted under the current root: {e}"))?;
        cert.certified
            .keys_match()
            .map_err(|e| format!("key and certificate differ: {e}"))?;
        if !cert.is_valid(now) {
            return Err("expired".into());
        }
        Ok((key, cert))
    }
}

#[derive(Debug)]
pub struct CertCache {
    dir: PathBuf,
}

/// The filesystem type of the nearest existing directory at or above `dir`, which a
/// directory created there would share.
fn fs_type(dir: &Path) -> Result<i64, CertCacheError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    nix::sys::statfs::statfs(existing)
        // The type's width differs between platforms.
        .map(|s| {
            #[allow(clippy::unnecessary_cast)]
            let t = s.filesystem_type().0 as i64;
            t
        })
        .map_err(|e| CertCacheError::Io {
            dir: dir.to_path_buf(),
            source: io::Error::from(e),
        })
}

fn check_memory_backed(dir: &Path) -> Result<(), CertCacheError> {
    match fs_type(dir)? {
        TMPFS_MAGIC | RAMFS_MAGIC => Ok(()),
        other => Err(CertCacheError::NotInMemory {
            dir: dir.to_path_buf(),
            fs_type: other,
        }),
    }
}

impl CertCache {
    /// Opens (creating it 0700 if missing) the cache directory, after checking that it
    /// lives in memory and is the agent's alone. Leftover temporary files go.
    pub fn open(dir: &Path) -> Result<CertCache, CertCacheError> {
        let io_err = |source| CertCacheError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        // Checked before anything is created, so nothing lands on a disk.
        check_memory_backed(dir)?;
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err)?;
        }
        // Again on the directory itself: a mount point below may differ.
        check_memory_backed(dir)?;
        let meta = fs::metadata(dir).map_err(io_err)?;
        if !meta.is_dir() {
            return Err(CertCacheError::NotADirectory {
                dir: dir.to_path_buf(),
            });
        }
        let agent = nix::unistd::geteuid().as_raw();
        if meta.uid() != agent {
            return Err(CertCacheError::Owner {
                dir: dir.to_path_buf(),
                owner: meta.uid(),
                agent,
            });
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CertCacheError::Accessible {
                dir: dir.to_path_buf(),
                mode,
            });
        }
        let cache = CertCache {
            dir: dir.to_path_buf(),
        };
        for entry in fs::read_dir(dir).map_err(io_err)?.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One file per identity. Identity segments hold only `[a-z0-9.-]`, so `_` joins
    /// them unambiguously.
    fn file_name(identity: &Identity) -> String {
        format!(
            "{}_{}_{}.json",
            identity.trust_domain, identity.namespace, identity.service_account
        )
    }

    fn path(&self, identity: &Identity) -> PathBuf {
        self.dir.join(Self::file_name(identity))
    }

    /// What was kept for `identity`, unchecked (the caller verifies it), if anything.
    pub fn load(&self, identity: &Identity) -> Result<Option<CachedCertificate>, String> {
        let path = self.path(identity);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Replaces the file of `identity` atomically; the file is 0600 from its creation.
    pub fn store(&self, identity: &Identity, entry: &CachedCertificate) -> io::Result<()> {
        let path = self.path(identity);
        let tmp = self.dir.join(format!(".{}.tmp", Self::file_name(identity)));
        let _ = fs::remove_file(&tmp);
        let body = serde_json::to_vec(entry).map_err(io::Error::other)?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&body)?;
        drop(file);
        fs::rename(&tmp, &path)
    }

    /// Forgets `identity` (its last pod left the node).
    pub fn remove(&self, identity: &Identity) {
        let _ = fs::remove_file(self.path(identity));
    }

    /// Removes the files of identities not in `keep` (pods that left while the agent
    /// was down).
    pub fn retain<'a>(&self, keep: impl IntoIterator<Item = &'a Identity>) {
        let keep: Vec<String> = keep.into_iter().map(Self::file_name).collect();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json") && !keep.contains(&name) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{identity::ca::authority::new_csr, identity::ca::authority::CertificateAuthority};

    fn kept(ca: &CertificateAuthority, id: &Identity) -> CachedCertificate {
        let (key, csr) = new_csr(id).unwrap();
        CachedCertificate {
            identity: id.to_string(),
            key: key.serialize_pem(),
            chain: ca.sign(&csr, id).unwrap(),
        }
    }

    #[test]
    fn a_kept_certificate_is_used_only_when_peers_would_accept_it() {
        let ca = CertificateAuthority::generate("cluster.local", Duration::from_secs(60)).unwrap();
        let trust = TrustBundle::from_pem(ca.root_pem()).unwrap();
        let id = Identity::new("cluster.local", "apps", "client");
        let other = Identity::new("cluster.local", "apps", "admin");
        let now = SystemTime::now();
        let good = kept(&ca, &id);
        let (_, cert) = good.usable(&id, &trust, now).unwrap();
        assert!(cert.is_valid(now));

        let err = |entry: &CachedCertificate, at: SystemTime| {
            entry.usable(&id, &trust, at).map(|_| ()).unwrap_err()
        };
        // Expired.
        assert!(err(&good, now + Duration::from_secs(120)).contains("expired"));
        // Another identity's file or certificate.
        assert!(err(&kept(&ca, &other), now).contains("admin"));
        let renamed = CachedCertificate {
            identity: id.to_string(),
            ..kept(&ca, &other)
        };
        assert!(err(&renamed, now).contains("names"));
        // Signed under another root (the mesh root was replaced).
        let old = CertificateAuthority::generate("cluster.local", Duration::from_secs(60)).unwrap();
        assert!(err(&kept(&old, &id), now).contains("current root"));
        // A key that is not the certificate's.
        let swapped = CachedCertificate {
            key: kept(&ca, &id).key,
            ..good.clone()
        };
        assert!(err(&swapped, now).contains("differ"));
        // Garbage.
        let garbage = CachedCertificate {
            key: "nonsense".into(),
            ..good
        };
        assert!(err(&garbage, now).contains("private key"));
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "apps", sa)
    }

    /// A tmpfs directory to test in (/dev/shm is tmpfs on Linux machines).
    fn shm_dir() -> Option<tempfile::TempDir> {
        let dir = tempfile::tempdir_in("/dev/shm").ok()?;
        (fs_type(dir.path()).ok()? == TMPFS_MAGIC).then_some(dir)
    }

    #[test]
    fn entries_round_trip_in_private_files_and_leftovers_go() {
        let Some(base) = shm_dir() else {
            eprintln!("no tmpfs at /dev/shm; skipped");
            return;
        };
        let dir = base.path().join("certs");
        let cache = CertCache::open(&dir).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let entry = CachedCertificate {
            identity: id("web").to_string(),
            key: "key".into(),
            chain: "chain".into(),
        };
        cache.store(&id("web"), &entry).unwrap();
        cache.store(&id("web"), &entry).unwrap();
        cache.store(&id("db"), &entry).unwrap();
        assert_eq!(cache.load(&id("web")).unwrap(), Some(entry));
        assert_eq!(cache.load(&id("nobody")).unwrap(), None);
        let file = dir.join("cluster.local_apps_web.json");
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        cache.retain([&id("web")]);
        assert_eq!(cache.load(&id("db")).unwrap(), None);
        cache.remove(&id("web"));
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);

        fs::write(dir.join("garbage_x_y.json"), "{").unwrap();
        let broken = Identity::new("garbage", "x", "y");
        assert!(cache.load(&broken).is_err());
        fs::write(dir.join(".half.json.tmp"), "x").unwrap();
        CertCache::open(&dir).unwrap();
        assert!(!dir.join(".half.json.tmp").exists(), "leftovers removed");
    }

    #[test]
    fn a_directory_open_to_others_is_refused() {
        let Some(base) = shm_dir() else {
            eprintln!("no tmpfs at /dev/shm; skipped");
            return;
        };
        let dir = base.path().join("open");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
        let err = CertCache::open(&dir).unwrap_err();
        assert!(matches!(err, CertCacheError::Accessible { .. }), "{err}");
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }

    #[test]
    fn a_directory_on_a_disk_is_refused_and_not_created() {
        let base = tempfile::tempdir().unwrap();
        if fs_type(base.path()).unwrap() == TMPFS_MAGIC {
            eprintln!("the temporary directory is on tmpfs; skipped");
            return;
        }
        let dir = base.path().join("certs");
        let err = CertCache::open(&dir).unwrap_err();
        assert!(matches!(err, CertCacheError::NotInMemory { .. }), "{err}");
        assert!(err.to_string().contains("--cert-cache-dir"), "{err}");
        assert!(!dir.exists(), "nothing created on the disk");
    }
}
