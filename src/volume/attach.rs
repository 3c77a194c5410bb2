//! Attaching volumes and host directories to a mount: the part of grafting that
//! belongs to the volume store, done by the mount code before the union exists.
//! Missing volumes are created (unless `:nocreate`), claims are taken under the
//! volumes' access modes, and each source is opened as a layer; the union then
//! only receives opened directories ([`GraftSources`]) and never opens the store.

use std::collections::HashMap;

use crate::config::{GraftSource, MountConfig};
use crate::layer::Layer;
use crate::union::{Setup, Union, graft_name};
use crate::volume::claims::{self, Claim, MountUse};
use crate::volume::{Store, Volume};

/// The opened sources of a mount's grafts, in the order of `MountConfig::grafts`,
/// and what must be held while the mount runs (claims) or until it is set up
/// (volume locks). Dropping it before the union is built gives everything back,
/// removing a `:delete` volume created for it.
#[derive(Default)]
pub struct GraftSources {
    pub(crate) layers: Vec<Layer>,
    /// Per graft: the volume (named volumes only) and its held lock. Declared before
    /// `claims` so that it drops first: a claim ending with `:delete` takes the
    /// volume's lock to remove it, and would wait forever on ours.
    pub(crate) volumes: Vec<Option<(Volume, std::fs::File)>>,
    pub(crate) claims: Vec<Claim>,
}

impl GraftSources {
    /// For a union without grafts.
    pub fn none() -> GraftSources {
        GraftSources::default()
    }
}

/// Opens the sources of the grafts of `config`, after refusing targets the layers
/// cannot take (`Union::check_graft_targets`), so that a refused mount creates no
/// volume. Nothing is mounted yet, so a failure here leaves no trace.
pub fn open(config: &MountConfig, setup: &Setup) -> std::result::Result<GraftSources, String> {
    let mut sources = GraftSources::none();
    if config.grafts.is_empty() {
        return Ok(sources);
    }
    Union::check_graft_targets(config, setup)?;
    for (i, a) in config.grafts.iter().enumerate() {
        // Checked before any volume lock is taken: locking one volume twice would wait
        // on ourselves.
        if config.grafts[..i].iter().any(|b| b.source == a.source) {
            return Err(format!(
                "{}: grafted twice in one mount",
                graft_name(&a.source)
            ));
        }
        for b in &config.grafts {
            if a.target != b.target && b.target.starts_with(&a.target) {
                return Err(format!(
                    "{}: {} lies inside the graft at {}; nested grafts are not supported",
                    graft_name(&b.source),
                    b.target.display(),
                    a.target.display()
                ));
            }
        }
    }
    let writable_mount = !config.read_only();
    // Volume locks are taken in name order, so that two mounts of the same volumes
    // listed in different orders cannot wait on each other.
    let mut locked = HashMap::new();
    let mut names: Vec<(&String, bool)> = config
        .grafts
        .iter()
        .filter_map(|g| match &g.source {
            GraftSource::Volume(n) => Some((n, !g.nocreate)),
            GraftSource::Bind(_) => None,
        })
        .collect();
    names.sort();
    let mut store = None;
    if !names.is_empty() {
        let s = Store::open(config.state_dir.as_deref()).map_err(|e| e.to_string())?;
        for (name, create) in names {
            let held = s.lock_volume(name, create).map_err(|e| e.to_string())?;
            locked.insert(name.clone(), held);
        }
        store = Some(s);
    }
    for spec in &config.grafts {
        let what = graft_name(&spec.source);
        let (path, volume) = match &spec.source {
            GraftSource::Bind(p) => (p.clone(), None),
            GraftSource::Volume(name) => {
                let (vol, lock, created) = locked.remove(name).ok_or("volume lock lost")?;
                let who = MountUse {
                    pid: std::process::id(),
                    mountpoint: config.mountpoint.clone(),
                    target: spec.target.clone(),
                    read_only: spec.read_only || !writable_mount,
                };
                let mut claim = claims::claim(name, &vol.dir, &who, vol.meta.access())
                    .map_err(|e| e.to_string())?;
                if let (true, true, Some(s)) = (spec.delete, created, &store) {
                    claim.remove_volume_on_drop(s.clone());
                }
                sources.claims.push(claim);
                (vol.data_dir(), Some((vol, lock)))
            }
        };
        let layer = Layer::open(&path).map_err(|e| format!("{what}: {}: {e}", path.display()))?;
        sources.layers.push(layer);
        sources.volumes.push(volume);
    }
    Ok(sources)
}
