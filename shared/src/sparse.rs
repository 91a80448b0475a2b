//! Sparse tensors: rows of embedding tables addressed by feature id, next to dense tensors.
//!
//! # Wire format (sparse updates and submodels)
//!
//! One safetensors body. Every dense tensor of the model travels under its own name as `F32`, as in
//! a dense update. Every sparse table `T` (a 2-D tensor `[rows, width]` of the model) travels as two
//! tensors:
//!
//! - `T:ids`: `I64`, shape `[n]`, the feature ids (row numbers), each in `0..rows`, no duplicates
//!   (any order is accepted; [`SparseTensors::encode`] writes them ascending);
//! - `T:rows`: `F32`, shape `[n, width]`, row `k` belongs to id `k`.
//!
//! `n` may be 0 (a device that touched no row of `T`). The same layout carries a submodel download
//! (dense tensors plus the requested rows, absolute values) and a device's update (dense Delta plus
//! the Delta of the rows it touched). The checks an upload passes ([`SparseTensors::decode_checked`])
//! are those of a dense update plus: ids inside the table (`unknown_row`), no duplicate id
//! (`duplicate_row`), `T:rows` of the table's width and of as many rows as ids (`width_mismatch`,
//! `row_count_mismatch`), ids as `I64` (`dtype_mismatch`), and at most [`MAX_ROWS_PER_UPDATE`]
//! rows per table (`too_many_rows`).

use std::collections::{BTreeMap, HashSet};

use safetensors::{Dtype, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::{
    fedsubavg::Heat,
    tensors::{NamedTensors, Tensor, TensorError, TensorSpec, check_values},
};

/// Separator between a table's name and its `ids`/`rows` part (never in burn's dotted paths).
pub const PART_SEPARATOR: char = ':';
/// Most rows of one table a single update or submodel request may carry.
pub const MAX_ROWS_PER_UPDATE: usize = 1 << 20;

/// A row-addressable table of a model: `rows x width` f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableShape {
    pub rows: u64,
    pub width: usize,
}

impl TableShape {
    /// Bytes of the whole table as f32 (a table file, a snapshot).
    pub fn bytes(&self) -> u64 {
        self.rows * self.width as u64 * 4
    }
}

/// Some rows of one table.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SparseRows {
    pub ids: Vec<u64>,
    /// `ids.len() * width` values, row-major.
    pub values: Vec<f32>,
    pub width: usize,
}

impl SparseRows {
    pub fn new(width: usize) -> Self {
        SparseRows {
            ids: Vec::new(),
            values: Vec::new(),
            width,
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The values of the `k`-th row carried (not of feature id `k`).
    pub fn row(&self, k: usize) -> &[f32] {
        &self.values[k * self.width..(k + 1) * self.width]
    }

    pub fn push(&mut self, id: u64, row: &[f32]) {
        debug_assert_eq!(row.len(), self.width);
        self.ids.push(id);
        self.values.extend_from_slice(row);
    }

    /// The same rows ordered by id.
    pub fn sorted(&self) -> SparseRows {
        let mut order: Vec<usize> = (0..self.ids.len()).collect();
        order.sort_by_key(|&k| self.ids[k]);
        let mut out = SparseRows::new(self.width);
        for k in order {
            out.push(self.ids[k], self.row(k));
        }
        out
    }
}

/// Dense tensors plus rows of sparse tables (a submodel, or a device's sparse update).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SparseTensors {
    pub dense: NamedTensors,
    pub tables: BTreeMap<String, SparseRows>,
}

/// Why a sparse body was refused. Each variant has a stable code for API error bodies.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SparseError {
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error("table `{table}` has {rows} rows; row id {id} does not exist")]
    UnknownRow { table: String, id: i64, rows: u64 },
    #[error("row {id} of table `{table}` is held by no enrolled device")]
    UnheldRow { table: String, id: u64 },
    #[error("table `{table}` lists row id {id} more than once")]
    DuplicateRow { table: String, id: u64 },
    #[error("`{table}:rows` has width {found}, the table's width is {expected}")]
    WidthMismatch {
        table: String,
        expected: usize,
        found: usize,
    },
    #[error("`{table}:rows` has shape {found:?}, expected [{ids}, width] for {ids} ids")]
    RowCountMismatch {
        table: String,
        ids: usize,
        found: Vec<usize>,
    },
    #[error("table `{table}` carries {count} rows, more than the {MAX_ROWS_PER_UPDATE} allowed at once")]
    TooManyRows { table: String, count: usize },
}

impl SparseError {
    /// Stable, greppable code used in HTTP error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            SparseError::Tensor(e) => e.code(),
            SparseError::UnknownRow { .. } | SparseError::UnheldRow { .. } => "unknown_row",
            SparseError::DuplicateRow { .. } => "duplicate_row",
            SparseError::WidthMismatch { .. } => "width_mismatch",
            SparseError::RowCountMismatch { .. } => "row_count_mismatch",
            SparseError::TooManyRows { .. } => "too_many_rows",
        }
    }
}

/// The dense specs and the table shapes of a model whose `tables` are row-addressable.
pub fn split_specs(
    specs: &[TensorSpec],
    tables: &[String],
) -> (Vec<TensorSpec>, BTreeMap<String, TableShape>) {
    let mut dense = Vec::new();
    let mut shapes = BTreeMap::new();
    for s in specs {
        if tables.contains(&s.name) && s.shape.len() == 2 {
            let shape = TableShape {
                rows: s.shape[0] as u64,
                width: s.shape[1],
            };
            shapes.insert(s.name.clone(), shape);
        } else {
            dense.push(s.clone());
        }
    }
    (dense, shapes)
}

fn ids_key(table: &str) -> String {
    format!("{table}{PART_SEPARATOR}ids")
}

fn rows_key(table: &str) -> String {
    format!("{table}{PART_SEPARATOR}rows")
}

/// Checks a list of ids against a table: inside it, no duplicates, not too many.
pub fn check_ids(table: &str, ids: &[u64], rows: u64) -> Result<(), SparseError> {
    if ids.len() > MAX_ROWS_PER_UPDATE {
        return Err(SparseError::TooManyRows {
            table: table.to_string(),
            count: ids.len(),
        });
    }
    let mut seen = HashSet::with_capacity(ids.len());
    for &id in ids {
        if id >= rows {
            return Err(SparseError::UnknownRow {
                table: table.to_string(),
                id: id.min(i64::MAX as u64) as i64,
                rows,
            });
        }
        if !seen.insert(id) {
            return Err(SparseError::DuplicateRow {
                table: table.to_string(),
                id,
            });
        }
    }
    Ok(())
}

impl SparseTensors {
    /// Serialises to the wire format above (ids ascending).
    pub fn encode(&self) -> Vec<u8> {
        let sorted: BTreeMap<&String, (Vec<i64>, SparseRows)> = self
            .tables
            .iter()
            .map(|(name, rows)| {
                let s = rows.sorted();
                let ids = s.ids.iter().map(|&id| id as i64).collect();
                (name, (ids, s))
            })
            .collect();
        let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
        for (name, t) in &self.dense.0 {
            let view = TensorView::new(Dtype::F32, t.shape.clone(), bytemuck::cast_slice(&t.data))
                .expect("shape matches data length by construction");
            views.push((name.clone(), view));
        }
        for (name, (ids, rows)) in &sorted {
            let view = TensorView::new(Dtype::I64, vec![ids.len()], bytemuck::cast_slice(ids))
                .expect("one id per element");
            views.push((ids_key(name), view));
            let view = TensorView::new(
                Dtype::F32,
                vec![rows.len(), rows.width],
                bytemuck::cast_slice(&rows.values),
            )
            .expect("width values per row");
            views.push((rows_key(name), view));
        }
        safetensors::serialize(views, None).expect("serialising in-memory tensors cannot fail")
    }

    /// Parses and checks a body against the model: `dense` specs exactly, every table of `tables`
    /// present (ids and rows), values finite and within `±limit`. The first problem found is returned.
    pub fn decode_checked(
        bytes: &[u8],
        dense: &[TensorSpec],
        tables: &BTreeMap<String, TableShape>,
        limit: f32,
    ) -> Result<Self, SparseError> {
        let st = crate::tensors::parse_safetensors(bytes)?;
        let mut dense_out = BTreeMap::new();
        let mut table_out = BTreeMap::new();
        for (table, shape) in tables {
            let (ik, rk) = (ids_key(table), rows_key(table));
            let ids_view = st
                .tensor(&ik)
                .map_err(|_| TensorError::MissingTensor(ik.clone()))?;
            let rows_view = st
                .tensor(&rk)
                .map_err(|_| TensorError::MissingTensor(rk.clone()))?;
            if ids_view.dtype() != Dtype::I64 {
                return Err(TensorError::DtypeMismatch {
                    name: ik,
                    found: format!("{:?}", ids_view.dtype()),
                    expected: "I64",
                }
                .into());
            }
            if ids_view.shape().len() != 1 {
                return Err(TensorError::ShapeMismatch {
                    name: ik,
                    expected: vec![ids_view.shape().iter().product()],
                    found: ids_view.shape().to_vec(),
                }
                .into());
            }
            let raw: Vec<i64> = bytemuck::pod_collect_to_vec(ids_view.data());
            if let Some(&bad) = raw.iter().find(|&&id| id < 0) {
                return Err(SparseError::UnknownRow {
                    table: table.clone(),
                    id: bad,
                    rows: shape.rows,
                });
            }
            let ids: Vec<u64> = raw.iter().map(|&id| id as u64).collect();
            check_ids(table, &ids, shape.rows)?;
            if rows_view.dtype() != Dtype::F32 {
                return Err(TensorError::DtypeMismatch {
                    name: rk,
                    found: format!("{:?}", rows_view.dtype()),
                    expected: "F32",
                }
                .into());
            }
            let rshape = rows_view.shape();
            if rshape.len() != 2 || rshape[0] != ids.len() {
                return Err(SparseError::RowCountMismatch {
                    table: table.clone(),
                    ids: ids.len(),
                    found: rshape.to_vec(),
                });
            }
            if rshape[1] != shape.width {
                return Err(SparseError::WidthMismatch {
                    table: table.clone(),
                    expected: shape.width,
                    found: rshape[1],
                });
            }
            let values: Vec<f32> = bytemuck::pod_collect_to_vec(rows_view.data());
            check_values(&rk, &values, limit)?;
            table_out.insert(
                table.clone(),
                SparseRows {
                    ids,
                    values,
                    width: shape.width,
                },
            );
        }
        // In name order: safetensors lists tensors in hash order, and the same body must be refused
        // with the same message every time.
        let mut views = st.tensors();
        views.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, view) in views {
            if let Some((table, _)) = name.split_once(PART_SEPARATOR) {
                if tables.contains_key(table) && (name == ids_key(table) || name == rows_key(table)) {
                    continue;
                }
                return Err(TensorError::UnexpectedTensor(name).into());
            }
            if view.dtype() != Dtype::F32 {
                return Err(TensorError::DtypeMismatch {
                    name,
                    found: format!("{:?}", view.dtype()),
                    expected: "F32",
                }
                .into());
            }
            let data: Vec<f32> = bytemuck::pod_collect_to_vec(view.data());
            dense_out.insert(
                name,
                Tensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        let dense_out = NamedTensors(dense_out);
        dense_out.check(dense, limit)?;
        Ok(SparseTensors {
            dense: dense_out,
            tables: table_out,
        })
    }
}

/// A device's feature set: the rows of each table its local data touches (its submodel `R_i`), and
/// its sample count. Body of `PUT /v1/tasks/{id}/devices/{device_id}/features`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FeatureSet {
    /// 1 to 2^24, like an update's.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 16_777_216))]
    pub num_samples: u64,
    pub rows: BTreeMap<String, Vec<u64>>,
}

/// Answer to an enrolment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Enrolment {
    pub device_id: String,
    /// False when the device was already enrolled with exactly this feature set and sample count.
    pub changed: bool,
    /// Registered devices `N` and their samples after this enrolment.
    pub population: Heat,
}

/// Body of `POST /v1/tasks/{id}/submodel` (the answer is a sparse safetensors body) and of the
/// operator's `POST /v1/tasks/{id}/heat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RowsRequest {
    /// Model version the device was assigned; the current one when absent.
    #[serde(default)]
    pub version: Option<i64>,
    pub rows: BTreeMap<String, Vec<u64>>,
}

/// Heat of some rows, for operators and tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeatReport {
    pub population: Heat,
    /// Per table, the heat of each requested row, in request order.
    pub rows: BTreeMap<String, Vec<Heat>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> (Vec<TensorSpec>, BTreeMap<String, TableShape>) {
        let specs = vec![
            TensorSpec {
                name: "emb".into(),
                shape: vec![10, 2],
            },
            TensorSpec {
                name: "fc.bias".into(),
                shape: vec![1],
            },
        ];
        split_specs(&specs, &["emb".to_string()])
    }

    fn update(ids: &[u64], rows: &[f32]) -> SparseTensors {
        let mut t = SparseTensors::default();
        t.dense.0.insert(
            "fc.bias".into(),
            Tensor {
                shape: vec![1],
                data: vec![0.5],
            },
        );
        let mut r = SparseRows::new(2);
        for (k, &id) in ids.iter().enumerate() {
            r.push(id, &rows[2 * k..2 * k + 2]);
        }
        t.tables.insert("emb".into(), r);
        t
    }

    #[test]
    fn round_trip_sorts_ids() {
        let (dense, tables) = model();
        let u = update(&[7, 2], &[1.0, 2.0, 3.0, 4.0]);
        let back = SparseTensors::decode_checked(&u.encode(), &dense, &tables, 10.0).unwrap();
        assert_eq!(back.tables["emb"].ids, vec![2, 7]);
        assert_eq!(back.tables["emb"].values, vec![3.0, 4.0, 1.0, 2.0]);
        assert_eq!(back.dense, u.dense);
        let empty = update(&[], &[]);
        let back = SparseTensors::decode_checked(&empty.encode(), &dense, &tables, 10.0).unwrap();
        assert!(back.tables["emb"].is_empty());
    }

    #[test]
    fn each_bad_input_has_its_code() {
        let (dense, tables) = model();
        let code = |u: &SparseTensors| {
            SparseTensors::decode_checked(&u.encode(), &dense, &tables, 10.0)
                .unwrap_err()
                .code()
        };
        assert_eq!(code(&update(&[10], &[0.0, 0.0])), "unknown_row");
        assert_eq!(code(&update(&[3, 3], &[0.0; 4])), "duplicate_row");
        assert_eq!(code(&update(&[3], &[f32::NAN, 0.0])), "non_finite_value");
        assert_eq!(code(&update(&[3], &[11.0, 0.0])), "value_out_of_range");
        let mut wide = update(&[1], &[0.0, 0.0]);
        wide.tables.get_mut("emb").unwrap().width = 1;
        assert_eq!(code(&wide), "width_mismatch");
        let mut no_dense = update(&[1], &[0.0, 0.0]);
        no_dense.dense = NamedTensors::default();
        assert_eq!(code(&no_dense), "missing_tensor");
        let mut no_table = update(&[1], &[0.0, 0.0]);
        no_table.tables.clear();
        assert_eq!(code(&no_table), "missing_tensor");
        let mut other = update(&[1], &[0.0, 0.0]);
        other.tables.insert("zzz".into(), SparseRows::new(2));
        assert_eq!(code(&other), "unexpected_tensor");
        assert_eq!(
            SparseTensors::decode_checked(b"garbage", &dense, &tables, 10.0)
                .unwrap_err()
                .code(),
            "malformed_tensors"
        );
    }

    #[test]
    fn negative_and_mismatched_ids_are_refused() {
        let (dense, tables) = model();
        let rows = [0f32; 2];
        let ids = [-1i64];
        let bias = [0.5f32];
        let views = vec![
            (
                "emb:ids",
                TensorView::new(Dtype::I64, vec![1], bytemuck::cast_slice(&ids)).unwrap(),
            ),
            (
                "emb:rows",
                TensorView::new(Dtype::F32, vec![1, 2], bytemuck::cast_slice(&rows)).unwrap(),
            ),
            (
                "fc.bias",
                TensorView::new(Dtype::F32, vec![1], bytemuck::cast_slice(&bias)).unwrap(),
            ),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        let err = SparseTensors::decode_checked(&bytes, &dense, &tables, 10.0).unwrap_err();
        assert_eq!(err.code(), "unknown_row");
        let ids = [1i64, 2];
        let views = vec![
            (
                "emb:ids",
                TensorView::new(Dtype::I64, vec![2], bytemuck::cast_slice(&ids)).unwrap(),
            ),
            (
                "emb:rows",
                TensorView::new(Dtype::F32, vec![1, 2], bytemuck::cast_slice(&rows)).unwrap(),
            ),
            (
                "fc.bias",
                TensorView::new(Dtype::F32, vec![1], bytemuck::cast_slice(&bias)).unwrap(),
            ),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        let err = SparseTensors::decode_checked(&bytes, &dense, &tables, 10.0).unwrap_err();
        assert_eq!(err.code(), "row_count_mismatch");
        let fids = [1f32];
        let views = vec![
            (
                "emb:ids",
                TensorView::new(Dtype::F32, vec![1], bytemuck::cast_slice(&fids)).unwrap(),
            ),
            (
                "emb:rows",
                TensorView::new(Dtype::F32, vec![1, 2], bytemuck::cast_slice(&rows)).unwrap(),
            ),
            (
                "fc.bias",
                TensorView::new(Dtype::F32, vec![1], bytemuck::cast_slice(&bias)).unwrap(),
            ),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        let err = SparseTensors::decode_checked(&bytes, &dense, &tables, 10.0).unwrap_err();
        assert_eq!(err.code(), "dtype_mismatch");
    }
}
