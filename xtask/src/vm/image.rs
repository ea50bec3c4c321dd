//! The VM's disk: Debian bookworm with its own kernel, made once with debootstrap from
//! the mirror the machine's apt sources name, turned into a raw ext4 image and cached
//! under `target/vm/image-<hash of the recipe>`; a warm run only checks it is there.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use super::{run_logged, step_done};

/// The Debian release whose kernel the tests run on (6.1).
pub(crate) const SUITE: &str = "bookworm";

/// What the guest needs besides minbase: its kernel (and, for the initrd to find the
/// root disk, udev), `ip` for the simulated cluster's namespaces, modprobe for the
/// veth and bridge modules the kernel loads on demand.
const PACKAGES: &[&str] = &["linux-image-amd64", "udev", "iproute2", "kmod"];

/// PID 1 in the guest: mounts the per-run payload disk and runs its script.
const GUEST_INIT: &str = include_str!("guest-init.sh");
const GUEST_INIT_PATH: &str = "sbin/nodemesh-init";

/// Bump when the steps below change in a way the recipe text does not show.
const RECIPE_VERSION: u32 = 1;

/// A built image and the kernel booted with it.
pub(crate) struct Image {
    pub rootfs: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel's release (`uname -r`), from its file name.
    pub release: String,
    pub init: &'static str,
}

fn recipe() -> String {
    format!(
        "recipe {RECIPE_VERSION}\nsuite {SUITE}\nvariant minbase\npackages {}\ninit {GUEST_INIT_PATH}\n{GUEST_INIT}",
        PACKAGES.join(",")
    )
}

/// FNV-1a: a stable hash for the cache key (std's hasher may change between releases).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The image for the current recipe: reused if built before, else built now.
pub(crate) fn ensure(vm_dir: &Path) -> Result<Image> {
    let key = format!("{:016x}", fnv1a(&recipe()));
    let dir = vm_dir.join(format!("image-{key}"));
    if let Some(image) = read_image(&dir) {
        eprintln!(
            "xtask: vm: image cached at {} (kernel {})",
            dir.display(),
            image.release
        );
        return Ok(image);
    }
    let started = Instant::now();
    eprintln!("xtask: vm: building the {SUITE} image (cold: debootstrap, a few minutes)");
    let build = vm_dir.join(format!("build-{key}"));
    remove_build_dir(&build)?;
    fs::create_dir_all(&build)?;
    let root = build.join("root");
    let mirror = mirror()?;
    let t = Instant::now();
    run_logged(
        Command::new("nice")
            .args(["-n", "10", "debootstrap", "--variant=minbase"])
            .arg(format!("--include={}", PACKAGES.join(",")))
            .arg(SUITE)
            .arg(&root)
            .arg(&mirror),
        &build.join("debootstrap.log"),
    )
    .context("debootstrap (log kept in the build directory)")?;
    step_done("debootstrap", t);

    let t = Instant::now();
    trim(&root)?;
    let init = root.join(GUEST_INIT_PATH);
    fs::write(&init, GUEST_INIT)?;
    set_mode(&init, 0o755)?;
    let (kernel, initrd, release) = kernel_files(&root)?;
    fs::copy(&kernel, build.join("vmlinuz"))?;
    fs::copy(&initrd, build.join("initrd.img"))?;
    fs::write(build.join("kernel-release"), &release)?;
    // Room for what the guest writes outside its tmpfs (the disk is a snapshot: the
    // cached image itself is never written).
    let size_mb = dir_size_mb(&root)? * 5 / 4 + 256;
    run_logged(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "nodemesh-vm", "-d"])
            .arg(&root)
            .arg(build.join("rootfs.img"))
            .arg(format!("{size_mb}M")),
        &build.join("mkfs.log"),
    )?;
    remove_build_dir(&root)?;
    fs::write(build.join("recipe"), recipe())?;
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::rename(&build, &dir)?;
    step_done("image from the root filesystem", t);
    remove_other_images(vm_dir, &dir);
    step_done("cold image build", started);
    read_image(&dir).context("the image just built is incomplete")
}

fn read_image(dir: &Path) -> Option<Image> {
    let image = Image {
        rootfs: dir.join("rootfs.img"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        release: fs::read_to_string(dir.join("kernel-release")).ok()?,
        init: "/sbin/nodemesh-init",
    };
    let complete = fs::read_to_string(dir.join("recipe")).ok()? == recipe()
        && [&image.rootfs, &image.kernel, &image.initrd]
            .iter()
            .all(|p| p.is_file());
    complete.then_some(image)
}

/// The Debian mirror of the machine's apt sources (`NODEMESH_VM_MIRROR` overrides it).
fn mirror() -> Result<String> {
    if let Ok(m) = std::env::var("NODEMESH_VM_MIRROR") {
        return Ok(m);
    }
    let mut texts = Vec::new();
    if let Ok(t) = fs::read_to_string("/etc/apt/sources.list") {
        texts.push((false, t));
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let deb822 = p.extension().is_some_and(|e| e == "sources");
            let list = p.extension().is_some_and(|e| e == "list");
            if deb822 || list {
                if let Ok(t) = fs::read_to_string(&p) {
                    texts.push((deb822, t));
                }
            }
        }
    }
    let entries: Vec<(String, Vec<String>)> = texts
        .iter()
        .flat_map(|(deb822, t)| {
            if *deb822 {
                deb822_entries(t)
            } else {
                list_entries(t)
            }
        })
        .collect();
    pick_mirror(&entries).context(
        "no Debian mirror found in /etc/apt/sources.list{,.d}: set NODEMESH_VM_MIRROR to one",
    )
}

/// The first source that serves bookworm itself, else the first Debian main archive
/// (a suite without a `-updates`/`-security` suffix, not a security archive).
fn pick_mirror(entries: &[(String, Vec<String>)]) -> Option<String> {
    let main_archive = |(uri, suites): &&(String, Vec<String>)| {
        !uri.contains("security") && suites.iter().any(|s| !s.contains('-'))
    };
    entries
        .iter()
        .filter(main_archive)
        .find(|(_, suites)| suites.iter().any(|s| s == SUITE))
        .or_else(|| entries.iter().find(main_archive))
        .map(|(uri, _)| uri.clone())
}

/// `Types: deb` stanzas of a deb822 `.sources` file: (first URI, suites).
fn deb822_entries(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
            })
        };
        let enabled = field("Enabled").is_none_or(|v| v != "no");
        let deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        if let (true, true, Some(uris), Some(suites)) =
            (enabled, deb, field("URIs"), field("Suites"))
        {
            if let Some(uri) = uris.split_whitespace().next() {
                let suites = suites.split_whitespace().map(String::from).collect();
                out.push((uri.to_string(), suites));
            }
        }
    }
    out
}

/// `deb [options] URI suite components` lines of a one-line `.list` file.
fn list_entries(text: &str) -> Vec<(String, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("deb ")?;
            let rest = match rest.trim_start().strip_prefix('[') {
                Some(r) => r.split_once(']')?.1,
                None => rest,
            };
            let mut words = rest.split_whitespace();
            Some((words.next()?.to_string(), vec![words.next()?.to_string()]))
        })
        .collect()
}

/// Drops what the guest never reads: downloaded packages, apt lists, documentation.
fn trim(root: &Path) -> Result<()> {
    for dir in [
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/locale",
    ] {
        let path = root.join(dir);
        if let Ok(entries) = fs::read_dir(&path) {
            for e in entries.flatten() {
                let p = e.path();
                let result = if e.file_type().is_ok_and(|t| t.is_dir()) {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
                result.with_context(|| format!("removing {}", p.display()))?;
            }
        }
    }
    Ok(())
}

/// The kernel and initrd in the root filesystem's /boot, and the kernel's release.
fn kernel_files(root: &Path) -> Result<(PathBuf, PathBuf, String)> {
    let boot = root.join("boot");
    let mut releases: Vec<String> = fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("vmlinuz-").map(String::from)
        })
        .filter(|r| boot.join(format!("initrd.img-{r}")).is_file())
        .collect();
    releases.sort();
    let Some(release) = releases.pop() else {
        bail!("no kernel with an initrd in {}", boot.display());
    };
    Ok((
        boot.join(format!("vmlinuz-{release}")),
        boot.join(format!("initrd.img-{release}")),
        release,
    ))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn dir_size_mb(dir: &Path) -> Result<u64> {
    let out = Command::new("du")
        .args(["-sm", "-x"])
        .arg(dir)
        .output()
        .context("running du")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du -sm {}: {text}", dir.display()))
}

/// Unmounts whatever a failed debootstrap left mounted inside `dir` (its /proc, /sys),
/// then removes `dir`, so a removal never descends into the host's pseudo-filesystems.
fn remove_build_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut inside: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    inside.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for m in inside {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

/// Images of older recipes only take space.
fn remove_other_images(vm_dir: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(vm_dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p != keep && name.starts_with("image-") {
            let _ = fs::remove_dir_all(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_main_archive_in_apt_sources() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n";
        let entries = deb822_entries(deb822);
        assert_eq!(entries.len(), 2);
        assert_eq!(
            pick_mirror(&entries).as_deref(),
            Some("http://mirror.example/debian")
        );
        let list = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://other.example/debian trixie main\ndeb-src http://x/debian trixie main\n";
        let entries = list_entries(list);
        assert_eq!(
            entries,
            vec![("http://other.example/debian".into(), vec!["trixie".into()])]
        );
        assert_eq!(
            pick_mirror(&entries).as_deref(),
            Some("http://other.example/debian")
        );
        let disabled = "Types: deb\nURIs: http://x/debian\nSuites: bookworm\nEnabled: no\n";
        assert!(pick_mirror(&deb822_entries(disabled)).is_none());
    }

    #[test]
    fn the_cache_key_follows_the_recipe() {
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a(&recipe()), fnv1a(&format!("{} ", recipe())));
    }
}
