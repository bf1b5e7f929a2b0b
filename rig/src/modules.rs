//! Kernel modules of the guest kernel package: finding a module's `.ko` by name and
//! ordering a set of modules so that every dependency is loaded before its dependents.
//! Debian's extracted package has no `modules.dep`, so dependencies are read from each
//! module's own `.modinfo` section (`depends=a,b`).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::RigError;

/// The `.ko` files under `<modules>/<kver>/kernel`, by module name.
pub struct ModuleTree {
    root: PathBuf,
    by_name: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
}

impl ModuleTree {
    /// Indexes `root` (a `lib/modules/<kver>` directory).
    pub fn open(root: &Path) -> Result<Self, RigError> {
        let mut by_name = HashMap::new();
        let mut stack = vec![root.join("kernel")];
        while let Some(dir) = stack.pop() {
            let entries = fs::read_dir(&dir).map_err(|e| RigError::io(&dir, e))?;
            for entry in entries {
                let path = entry.map_err(|e| RigError::io(&dir, e))?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Some(stem) = path.file_name().and_then(|n| n.to_str()) {
                    if let Some(name) = stem.strip_suffix(".ko") {
                        by_name.insert(module_name(name), path);
                    }
                }
            }
        }
        // "kernel/fs/ext4/ext4.ko" lines: modules compiled into the kernel.
        let builtin = fs::read_to_string(root.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko").map(module_name))
            .collect();
        Ok(ModuleTree {
            root: root.to_path_buf(),
            by_name,
            builtin,
        })
    }

    /// The `.ko` files for `names` and all their dependencies, dependencies first, each
    /// once. Modules built into the kernel are skipped.
    pub fn load_order(&self, names: &[String]) -> Result<Vec<PathBuf>, RigError> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for name in names {
            self.visit(&module_name(name), &mut seen, &mut order, 0)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<PathBuf>,
        depth: usize,
    ) -> Result<(), RigError> {
        if !seen.insert(name.to_string()) || self.builtin.contains(name) {
            return Ok(());
        }
        let Some(ko) = self.by_name.get(name) else {
            return Err(RigError::ModuleNotFound {
                name: name.to_string(),
                dir: self.root.clone(),
            });
        };
        if depth > 64 {
            return Err(RigError::ModuleNotFound {
                name: format!("{name} (dependency chain deeper than 64)"),
                dir: self.root.clone(),
            });
        }
        let bytes = fs::read(ko).map_err(|e| RigError::io(ko, e))?;
        for dep in modinfo_depends(&bytes) {
            self.visit(&dep, seen, order, depth + 1)?;
        }
        order.push(ko.clone());
        Ok(())
    }
}

/// Module names use '_' where file names may use '-' (kvm-amd.ko is module kvm_amd).
fn module_name(s: &str) -> String {
    s.replace('-', "_")
}

/// The `depends=` list of a module's `.modinfo` section (NUL-separated `key=value`s).
fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(start) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &ko[start + KEY.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(module_name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_depends_field() {
        let ko = b"\x7fELF...\0license=GPL\0depends=virtio_ring,virtio\0retpoline=Y\0";
        assert_eq!(modinfo_depends(ko), ["virtio_ring", "virtio"]);
        assert!(modinfo_depends(b"\0depends=\0name=x\0").is_empty());
        assert!(modinfo_depends(b"no modinfo").is_empty());
    }

    #[test]
    fn orders_dependencies_first() {
        let dir = std::env::temp_dir().join(format!("rig-modtest-{}", std::process::id()));
        let kdir = dir.join("kernel/drivers");
        fs::create_dir_all(&kdir).unwrap();
        fs::write(kdir.join("a-b.ko"), b"\0depends=c,d\0").unwrap();
        fs::write(kdir.join("c.ko"), b"\0depends=d\0").unwrap();
        fs::write(kdir.join("d.ko"), b"\0depends=e\0").unwrap();
        fs::write(dir.join("modules.builtin"), "kernel/x/e.ko\n").unwrap();
        let tree = ModuleTree::open(&dir).unwrap();
        let order = tree.load_order(&["a_b".into(), "c".into()]).unwrap();
        let names: Vec<_> = order
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["d.ko", "c.ko", "a-b.ko"]);
        assert!(matches!(
            tree.load_order(&["nope".into()]),
            Err(RigError::ModuleNotFound { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
