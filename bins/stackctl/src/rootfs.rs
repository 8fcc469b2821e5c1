//! An image's root filesystem assembled in memory: host binaries plus
//! exactly the shared libraries `ldd` lists for them, at the same paths, so a
//! `FROM scratch` image needs no base image (docker-offline.md §3(b)).

use crate::BuildError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One entry of the tree (paths are absolute inside the image).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir {
        mode: u32,
        uid: u64,
        gid: u64,
    },
    File {
        data: Vec<u8>,
        mode: u32,
    },
    /// A symbolic link to `target` (relative to the link's directory).
    Symlink {
        target: String,
    },
    /// A hard link to the file at `target` (absolute inside the image).
    HardLink {
        target: PathBuf,
    },
}

/// A file tree to send as (part of) a build context.
#[derive(Debug, Default, Clone)]
pub struct Rootfs {
    // BTreeMap: parents sort before their children, so the tar is ordered.
    entries: BTreeMap<PathBuf, Entry>,
}

impl Rootfs {
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory owned by `uid:gid` (its parents are root-owned 0755).
    pub fn dir(&mut self, path: &str, mode: u32, uid: u64, gid: u64) -> &mut Self {
        let path = PathBuf::from(path);
        self.parents(&path);
        self.entries.insert(path, Entry::Dir { mode, uid, gid });
        self
    }

    /// A file with `data`.
    pub fn file(&mut self, path: &Path, data: Vec<u8>, mode: u32) -> &mut Self {
        self.parents(path);
        self.entries
            .insert(path.to_path_buf(), Entry::File { data, mode });
        self
    }

    /// A symbolic link at `path` to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let path = PathBuf::from(path);
        self.parents(&path);
        self.entries.insert(
            path,
            Entry::Symlink {
                target: target.to_owned(),
            },
        );
        self
    }

    /// Copies `src` (symlinks followed, so the image gets the real file
    /// under the name `dest`) and every library `ldd src` lists, each at the
    /// path `ldd` prints. A static binary adds no library.
    pub fn binary_with_libs(&mut self, src: &Path, dest: &str) -> Result<&mut Self, BuildError> {
        let data = std::fs::read(src).map_err(|source| BuildError::Read {
            path: src.to_path_buf(),
            source,
        })?;
        self.file(Path::new(dest), data, 0o755);
        for lib in shared_libraries(src)? {
            if self.entries.contains_key(&lib) {
                continue;
            }
            let data = std::fs::read(&lib).map_err(|source| BuildError::Read {
                path: lib.clone(),
                source,
            })?;
            self.file(&lib, data, 0o755);
        }
        Ok(self)
    }

    /// Adds every library `ldd elf` lists (not `elf` itself), each at the
    /// path `ldd` prints.
    pub fn libraries_of(&mut self, elf: &Path) -> Result<&mut Self, BuildError> {
        for lib in shared_libraries(elf)? {
            if self.entries.contains_key(&lib) {
                continue;
            }
            let data = std::fs::read(&lib).map_err(|source| BuildError::Read {
                path: lib.clone(),
                source,
            })?;
            self.file(&lib, data, 0o755);
        }
        Ok(self)
    }

    /// Copies the tree under `root` at the same paths, as installed:
    /// regular files with their permission bits, symbolic links as links
    /// (their targets as written), hard links as hard links (RabbitMQ's
    /// seven CLI escripts are one 2 MB file). Returns the ELF files it
    /// copied, whose libraries the caller adds with [`Rootfs::libraries_of`].
    pub fn tree(&mut self, root: &Path) -> Result<Vec<PathBuf>, BuildError> {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let mut inodes: std::collections::HashMap<(u64, u64), PathBuf> =
            std::collections::HashMap::new();
        let read_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BuildError::Read { path, source }
        };
        let mut elves = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let mut children = Vec::new();
            for e in std::fs::read_dir(&dir).map_err(read_err(&dir))? {
                children.push(e.map_err(read_err(&dir))?.path());
            }
            children.sort();
            for path in children {
                let meta = std::fs::symlink_metadata(&path).map_err(read_err(&path))?;
                let name = path.to_string_lossy().into_owned();
                if meta.file_type().is_symlink() {
                    let target = std::fs::read_link(&path).map_err(read_err(&path))?;
                    self.symlink(&name, &target.to_string_lossy());
                } else if meta.is_dir() {
                    self.dir(&name, meta.permissions().mode() & 0o7777, 0, 0);
                    stack.push(path);
                } else if meta.is_file() {
                    if meta.nlink() > 1 {
                        let key = (meta.dev(), meta.ino());
                        if let Some(first) = inodes.get(&key) {
                            self.parents(&path);
                            self.entries.insert(
                                path.clone(),
                                Entry::HardLink {
                                    target: first.clone(),
                                },
                            );
                            continue;
                        }
                        inodes.insert(key, path.clone());
                    }
                    let data = std::fs::read(&path).map_err(read_err(&path))?;
                    if data.starts_with(b"\x7fELF") {
                        elves.push(path.clone());
                    }
                    self.file(&path, data, meta.permissions().mode() & 0o7777);
                }
            }
        }
        Ok(elves)
    }

    /// Whether `path` is in the tree.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(Path::new(path))
    }

    /// Total bytes of file content.
    pub fn content_size(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match e {
                Entry::File { data, .. } => data.len() as u64,
                Entry::Dir { .. } | Entry::Symlink { .. } | Entry::HardLink { .. } => 0,
            })
            .sum()
    }

    /// Appends the tree under `prefix/` to `tar` (`prefix` is the name the
    /// Dockerfile's `COPY` uses).
    pub fn append_to(
        &self,
        tar: &mut tar::Builder<Vec<u8>>,
        prefix: &str,
    ) -> Result<(), BuildError> {
        append_dir(tar, prefix, 0o755, 0, 0)?;
        let in_tar = |path: &Path| {
            let rel = path.strip_prefix("/").unwrap_or(path);
            format!("{prefix}/{}", rel.display())
        };
        for (path, entry) in &self.entries {
            let name = in_tar(path);
            match entry {
                Entry::Dir { mode, uid, gid } => append_dir(tar, &name, *mode, *uid, *gid)?,
                Entry::File { data, mode } => append_file(tar, &name, data, *mode)?,
                Entry::Symlink { target } => append_symlink(tar, &name, target)?,
                Entry::HardLink { .. } => {}
            }
        }
        // After every file, so each link's target is already in the tar.
        for (path, entry) in &self.entries {
            if let Entry::HardLink { target } = entry {
                append_hard_link(tar, &in_tar(path), &in_tar(target))?;
            }
        }
        Ok(())
    }

    fn parents(&mut self, path: &Path) {
        for p in path.ancestors().skip(1) {
            if p == Path::new("/") || p.as_os_str().is_empty() {
                break;
            }
            self.entries.entry(p.to_path_buf()).or_insert(Entry::Dir {
                mode: 0o755,
                uid: 0,
                gid: 0,
            });
        }
    }
}

/// Appends a regular file to `tar`.
pub fn append_file(
    tar: &mut tar::Builder<Vec<u8>>,
    name: &str,
    data: &[u8],
    mode: u32,
) -> Result<(), BuildError> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    tar.append_data(&mut h, name, data)
        .map_err(|source| BuildError::Context { source })
}

fn append_symlink(
    tar: &mut tar::Builder<Vec<u8>>,
    name: &str,
    target: &str,
) -> Result<(), BuildError> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    tar.append_link(&mut h, name, target)
        .map_err(|source| BuildError::Context { source })
}

fn append_hard_link(
    tar: &mut tar::Builder<Vec<u8>>,
    name: &str,
    target: &str,
) -> Result<(), BuildError> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    tar.append_link(&mut h, name, target)
        .map_err(|source| BuildError::Context { source })
}

fn append_dir(
    tar: &mut tar::Builder<Vec<u8>>,
    name: &str,
    mode: u32,
    uid: u64,
    gid: u64,
) -> Result<(), BuildError> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(0);
    h.set_cksum();
    tar.append_data(&mut h, format!("{name}/"), std::io::empty())
        .map_err(|source| BuildError::Context { source })
}

/// The absolute paths of the shared objects `ldd` lists for `bin`; empty for
/// a static binary. A library `ldd` cannot find is an error naming it.
pub fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>, BuildError> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|source| BuildError::Ldd {
            bin: bin.to_path_buf(),
            detail: format!(
                "cannot run ldd ({source}); install it with `apt-get install libc-bin`"
            ),
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // "not a dynamic executable" (static): nothing to copy.
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        return Err(BuildError::Ldd {
            bin: bin.to_path_buf(),
            detail: format!("{}{}", stdout.trim(), stderr.trim()),
        });
    }
    parse_ldd(&stdout).map_err(|detail| BuildError::Ldd {
        bin: bin.to_path_buf(),
        detail,
    })
}

/// Parses `ldd` output: every absolute path it prints (the resolved library
/// after `=>`, or the loader alone on its line).
fn parse_ldd(out: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in out.lines() {
        if line.contains("=> not found") {
            return Err(format!("a library is missing: {}", line.trim()));
        }
        if line.contains("statically linked") {
            continue;
        }
        libs.extend(
            line.split_whitespace()
                .filter(|w| w.starts_with('/'))
                .map(PathBuf::from),
        );
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_resolved_paths_and_the_loader() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out).expect("parsed"),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            parse_ldd("\tstatically linked\n").expect("static"),
            Vec::<PathBuf>::new()
        );
        let e = parse_ldd("\tlibfoo.so.1 => not found\n").expect_err("missing");
        assert!(e.contains("libfoo"), "{e}");
    }

    #[test]
    fn a_tree_becomes_an_ordered_tar_with_parents_and_owners() {
        let mut fs = Rootfs::new();
        fs.file(Path::new("/usr/local/bin/x"), b"bin".to_vec(), 0o755)
            .dir("/data", 0o755, 999, 1000)
            .dir("/tmp", 0o1777, 0, 0);
        let mut tar = tar::Builder::new(Vec::new());
        fs.append_to(&mut tar, "rootfs").expect("tar");
        let bytes = tar.into_inner().expect("finish");
        let mut ar = tar::Archive::new(&bytes[..]);
        let seen: Vec<(String, u32, u64)> = ar
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                let h = e.header();
                (
                    e.path().expect("path").display().to_string(),
                    h.mode().expect("mode"),
                    h.uid().expect("uid"),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("rootfs/", 0o755, 0),
                ("rootfs/data/", 0o755, 999),
                ("rootfs/tmp/", 0o1777, 0),
                ("rootfs/usr/", 0o755, 0),
                ("rootfs/usr/local/", 0o755, 0),
                ("rootfs/usr/local/bin/", 0o755, 0),
                ("rootfs/usr/local/bin/x", 0o755, 0),
            ]
            .map(|(p, m, u)| (p.to_owned(), m, u))
        );
        assert_eq!(fs.content_size(), 3);
    }

    #[test]
    fn a_tree_keeps_symlinks_hard_links_modes_and_finds_elf_files() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("opt");
        std::fs::create_dir_all(root.join("bin")).expect("mkdir");
        std::fs::write(root.join("bin/tool"), b"\x7fELF...").expect("write");
        std::fs::set_permissions(
            root.join("bin/tool"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        std::fs::write(root.join("a.txt"), b"text").expect("write");
        std::fs::hard_link(root.join("a.txt"), root.join("b.txt")).expect("link");
        std::os::unix::fs::symlink("bin/tool", root.join("tool")).expect("symlink");
        let mut fs = Rootfs::new();
        let elves = fs.tree(&root).expect("tree");
        assert_eq!(elves, [root.join("bin/tool")]);
        assert_eq!(fs.content_size(), 7 + 4, "the hard link's data once");
        let mut tar = tar::Builder::new(Vec::new());
        fs.append_to(&mut tar, "rootfs").expect("tar");
        let bytes = tar.into_inner().expect("finish");
        let mut ar = tar::Archive::new(&bytes[..]);
        let rel = |p: &Path| format!("rootfs{}", p.display());
        let seen: Vec<(String, tar::EntryType, u32, Option<String>)> = ar
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                (
                    e.path().expect("path").display().to_string(),
                    e.header().entry_type(),
                    e.header().mode().expect("mode"),
                    e.link_name()
                        .expect("link")
                        .map(|l| l.display().to_string()),
                )
            })
            .filter(|(p, ..)| p.starts_with(&rel(&root)))
            .collect();
        let (a, b) = (rel(&root.join("a.txt")), rel(&root.join("b.txt")));
        let first = seen.iter().position(|s| s.0 == a).expect("a.txt");
        let link = seen.iter().position(|s| s.0 == b).expect("b.txt");
        assert!(first < link, "{seen:?}");
        assert_eq!(seen[link].1, tar::EntryType::Link);
        assert_eq!(seen[link].3.as_deref(), Some(a.as_str()));
        let tool = seen
            .iter()
            .find(|s| s.0 == rel(&root.join("bin/tool")))
            .expect("tool");
        assert_eq!((tool.1, tool.2), (tar::EntryType::Regular, 0o755));
        let sym = seen
            .iter()
            .find(|s| s.0 == rel(&root.join("tool")))
            .expect("symlink");
        assert_eq!(
            (sym.1, sym.3.as_deref()),
            (tar::EntryType::Symlink, Some("bin/tool"))
        );
    }
}
