//! Fashion-MNIST loading from the original gzip IDX files.
//!
//! The simulation and the tests train on real data, so the loader is strict: magic numbers, image
//! size, counts and labels are all checked, and every error names the offending file. Pixels are
//! scaled to `[0, 1]` once at load time so the training loop only slices ready `f32` rows.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

/// Pixels per image (28 x 28, grayscale).
pub const IMAGE_PIXELS: usize = 28 * 28;
/// Number of classes in Fashion-MNIST.
pub const NUM_CLASSES: usize = 10;

const IMAGES_MAGIC: u32 = 2051;
const LABELS_MAGIC: u32 = 2049;

/// Images and labels of one split (or of one device's share of it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    /// Row-major images, `len() * IMAGE_PIXELS` values scaled to `[0, 1]`.
    pub images: Vec<f32>,
    /// One class in `0..NUM_CLASSES` per image.
    pub labels: Vec<u8>,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels of sample `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        &self.images[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS]
    }

    /// The samples at `idx`, in that order (a device's shard of a partition).
    ///
    /// # Panics
    /// If an index is out of bounds.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let mut images = Vec::with_capacity(idx.len() * IMAGE_PIXELS);
        let mut labels = Vec::with_capacity(idx.len());
        for &i in idx {
            images.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        Dataset { images, labels }
    }
}

/// Which half of Fashion-MNIST to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// 60,000 training samples (`train-*`).
    Train,
    /// 10,000 test samples (`t10k-*`).
    Test,
}

impl Split {
    fn file_names(self) -> (&'static str, &'static str) {
        match self {
            Split::Train => ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
            Split::Test => ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
        }
    }
}

/// Why a dataset file could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} has magic number {found}, expected {expected} (not an IDX file of that kind?)", path.display())]
    BadMagic {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
    #[error("{} is truncated: header promises {expected} bytes of data, found {found}", path.display())]
    Truncated {
        path: PathBuf,
        expected: usize,
        found: usize,
    },
    #[error("{} holds {rows}x{cols} images, expected 28x28", path.display())]
    BadImageSize { path: PathBuf, rows: u32, cols: u32 },
    #[error("{} holds {labels} labels but {} holds {images} images", labels_path.display(), images_path.display())]
    CountMismatch {
        images_path: PathBuf,
        images: usize,
        labels_path: PathBuf,
        labels: usize,
    },
    #[error("{} holds label {label} at index {index}, expected 0..=9", path.display())]
    BadLabel { path: PathBuf, index: usize, label: u8 },
}

/// `FASHION_MNIST_DIR` if set, else `/usr/share/datasets/fashion-mnist`.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("FASHION_MNIST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/datasets/fashion-mnist"))
}

/// Loads one split of Fashion-MNIST from the four standard gzip IDX files in `dir`.
pub fn load_fashion_mnist(dir: &Path, split: Split) -> Result<Dataset, DataError> {
    let (images_name, labels_name) = split.file_names();
    let images_path = dir.join(images_name);
    let labels_path = dir.join(labels_name);

    let (raw_images, n_images) = read_images(&images_path)?;
    let labels = read_labels(&labels_path)?;
    if labels.len() != n_images {
        return Err(DataError::CountMismatch {
            images_path,
            images: n_images,
            labels_path,
            labels: labels.len(),
        });
    }
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, l)| usize::from(**l) >= NUM_CLASSES)
    {
        return Err(DataError::BadLabel {
            path: labels_path,
            index,
            label,
        });
    }
    let images = raw_images.iter().map(|&p| f32::from(p) / 255.0).collect();
    Ok(Dataset { images, labels })
}

fn read_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    GzDecoder::new(std::io::BufReader::new(file))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    Ok(bytes)
}

/// Big-endian `u32` header fields; `None` when the file is shorter than the header.
fn header(bytes: &[u8], fields: usize) -> Option<Vec<u32>> {
    let head = bytes.get(..fields * 4)?;
    Some(
        head.chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

fn check_body(path: &Path, bytes: &[u8], header_len: usize, expected: usize) -> Result<(), DataError> {
    let found = bytes.len().saturating_sub(header_len);
    if found != expected {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected,
            found,
        });
    }
    Ok(())
}

fn read_images(path: &Path) -> Result<(Vec<u8>, usize), DataError> {
    let bytes = read_gz(path)?;
    let truncated = |found| DataError::Truncated {
        path: path.to_path_buf(),
        expected: 16,
        found,
    };
    let h = header(&bytes, 4).ok_or_else(|| truncated(bytes.len()))?;
    if h[0] != IMAGES_MAGIC {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            expected: IMAGES_MAGIC,
            found: h[0],
        });
    }
    let (n, rows, cols) = (h[1] as usize, h[2], h[3]);
    if rows as usize * cols as usize != IMAGE_PIXELS || rows != 28 {
        return Err(DataError::BadImageSize {
            path: path.to_path_buf(),
            rows,
            cols,
        });
    }
    check_body(path, &bytes, 16, n * IMAGE_PIXELS)?;
    let mut bytes = bytes;
    bytes.drain(..16);
    Ok((bytes, n))
}

fn read_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = read_gz(path)?;
    let h = header(&bytes, 2).ok_or_else(|| DataError::Truncated {
        path: path.to_path_buf(),
        expected: 8,
        found: bytes.len(),
    })?;
    if h[0] != LABELS_MAGIC {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            expected: LABELS_MAGIC,
            found: h[0],
        });
    }
    check_body(path, &bytes, 8, h[1] as usize)?;
    let mut bytes = bytes;
    bytes.drain(..8);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::{Compression, write::GzEncoder};

    use super::*;

    fn write_gz(path: &Path, bytes: &[u8]) {
        let mut enc = GzEncoder::new(std::fs::File::create(path).unwrap(), Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap();
    }

    fn idx_images(magic: u32, n: u32, pixels: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for v in [magic, n, 28, 28] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(pixels);
        out
    }

    fn idx_labels(magic: u32, labels: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for v in [magic, labels.len() as u32] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(labels);
        out
    }

    fn fixture(images: &[u8], labels: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_gz(&dir.path().join("t10k-images-idx3-ubyte.gz"), images);
        write_gz(&dir.path().join("t10k-labels-idx1-ubyte.gz"), labels);
        dir
    }

    #[test]
    fn loads_and_scales_a_small_file() {
        let mut pixels = vec![0u8; 2 * IMAGE_PIXELS];
        pixels[0] = 255;
        pixels[IMAGE_PIXELS + 1] = 51;
        let dir = fixture(
            &idx_images(IMAGES_MAGIC, 2, &pixels),
            &idx_labels(LABELS_MAGIC, &[3, 9]),
        );
        let ds = load_fashion_mnist(dir.path(), Split::Test).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.labels, vec![3, 9]);
        assert_eq!(ds.image(0)[0], 1.0);
        assert_eq!(ds.image(1)[1], 0.2);
        let sub = ds.subset(&[1]);
        assert_eq!(sub.labels, vec![9]);
        assert_eq!(sub.images, ds.image(1));
    }

    #[test]
    fn errors_name_the_file() {
        let pixels = vec![0u8; IMAGE_PIXELS];
        let dir = fixture(&idx_images(1234, 1, &pixels), &idx_labels(LABELS_MAGIC, &[0]));
        let err = load_fashion_mnist(dir.path(), Split::Test).unwrap_err();
        assert!(matches!(err, DataError::BadMagic { found: 1234, .. }));
        assert!(err.to_string().contains("t10k-images-idx3-ubyte.gz"), "{err}");

        let dir = fixture(
            &idx_images(IMAGES_MAGIC, 2, &pixels),
            &idx_labels(LABELS_MAGIC, &[0, 1]),
        );
        let err = load_fashion_mnist(dir.path(), Split::Test).unwrap_err();
        assert!(matches!(err, DataError::Truncated { .. }), "{err}");

        let dir = fixture(
            &idx_images(IMAGES_MAGIC, 1, &pixels),
            &idx_labels(LABELS_MAGIC, &[0, 1]),
        );
        let err = load_fashion_mnist(dir.path(), Split::Test).unwrap_err();
        assert!(matches!(err, DataError::CountMismatch { .. }), "{err}");

        let dir = fixture(
            &idx_images(IMAGES_MAGIC, 1, &pixels),
            &idx_labels(LABELS_MAGIC, &[10]),
        );
        let err = load_fashion_mnist(dir.path(), Split::Test).unwrap_err();
        assert!(matches!(err, DataError::BadLabel { label: 10, .. }), "{err}");

        let err = load_fashion_mnist(Path::new("/nonexistent-fedhive"), Split::Train).unwrap_err();
        assert!(err.to_string().contains("train-images-idx3-ubyte.gz"), "{err}");
    }
}
