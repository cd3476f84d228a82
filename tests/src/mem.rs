//! Images held in memory: new ones made by the core, and the files they
//! name (backing and data files) handed out by an in-memory opener.

use qcowkit_core::{
    create, BlockRead, CreateOptions, FileRole, MemError, OpenOptions, Opened, Opener,
    WritableImage,
};

/// The bytes of a new, empty image made by `create::format` with `opts`.
pub fn new_disk(opts: &CreateOptions) -> Vec<u8> {
    let mut disk = Vec::new();
    create::format(&mut disk, opts).unwrap_or_else(|e| panic!("create::format: {e}"));
    disk
}

/// A new, empty image made with `opts`, open for writing in memory (with
/// the default open options).
pub fn new_image(opts: &CreateOptions) -> WritableImage<Vec<u8>> {
    WritableImage::open(new_disk(opts), &OpenOptions::default())
        .unwrap_or_else(|e| panic!("open a new image: {e}"))
}

/// In-memory files handed out by name: an [`Opener`] for the backing and
/// data files of images held in memory. It gives each file as any storage
/// made from a `Vec<u8>` (the `Vec` itself, or a wrapper of the test's), and
/// records what it was asked for.
#[derive(Clone, Debug, Default)]
pub struct Files {
    files: Vec<(String, Vec<u8>)>,
    /// Every request, in order: (parent, name, role).
    pub asked: Vec<(String, String, FileRole)>,
}

impl Files {
    /// No files.
    pub fn new() -> Self {
        Self::default()
    }

    /// These files, plus `name` holding `bytes`.
    pub fn with(mut self, name: &str, bytes: Vec<u8>) -> Self {
        self.files.push((name.to_string(), bytes));
        self
    }

    /// A copy of the bytes of `name`; a missing file is the error of an
    /// access nothing can satisfy.
    pub fn get(&self, name: &str) -> Result<Vec<u8>, MemError> {
        self.files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
            .ok_or(MemError { offset: 0, len: 0 })
    }
}

impl<R> Opener<R> for Files
where
    R: BlockRead<Error = MemError> + From<Vec<u8>>,
{
    /// Hands out `name` under its own name (resolved name and identity).
    fn open(&mut self, parent: &str, name: &str, role: FileRole) -> Result<Opened<R>, MemError> {
        self.asked
            .push((parent.to_string(), name.to_string(), role));
        Ok(Opened {
            io: R::from(self.get(name)?),
            resolved: name.to_string(),
            identity: name.to_string(),
        })
    }
}
