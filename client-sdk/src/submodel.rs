//! FedSubAvg's submodel as an app module's weights.
//!
//! In a FedSubAvg task (Ding et al., "Federated Submodel Optimization for Hot and Cold Data
//! Features", NeurIPS 2022; rule in `ALGORITHMS.md`) a device downloads the dense tensors and only
//! the rows `R_i` of each sparse table that its data touches, and uploads the change of those
//! rows. An app's module takes part by holding a *local* table: the table's tensor in the module
//! has `|R_i|` rows, row `k` being feature id `R_i[k]` (ids ascending), and the app's batches use
//! those local indices. [`local_weights`] turns a downloaded submodel into such weights, and
//! [`rows_update`] turns the trained module's change back into rows of the global ids.

use std::collections::BTreeMap;

use fedhive_shared::sparse::{SparseRows, SparseTensors};
use fedhive_shared::{NamedTensors, Tensor};

/// Why a submodel and a module's weights do not fit each other.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmodelError {
    #[error("rows of table `{table}` are not ascending and distinct (row {id} after {previous})")]
    UnorderedRows { table: String, previous: u64, id: u64 },
    #[error("`{0}` is not a 2-D tensor of the app's module; a sparse table must be one")]
    NotATable(String),
    #[error("the trained weights have no tensor `{0}`")]
    MissingTensor(String),
    #[error("table `{table}`: the module holds {found:?}, the submodel {expected:?} ([rows, width])")]
    Shape {
        table: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
}

/// Checks that each table's ids are ascending and distinct: the order of a local table's rows.
pub fn check_rows(rows: &BTreeMap<String, Vec<u64>>) -> Result<(), SubmodelError> {
    for (table, ids) in rows {
        if let Some(w) = ids.windows(2).find(|w| w[0] >= w[1]) {
            return Err(SubmodelError::UnorderedRows {
                table: table.clone(),
                previous: w[0],
                id: w[1],
            });
        }
    }
    Ok(())
}

/// The weights of a module with local tables: the dense tensors as they are, and each table as a
/// `[rows, width]` tensor of its rows in ascending id order.
pub fn local_weights(sub: &SparseTensors) -> NamedTensors {
    let mut out = sub.dense.clone();
    for (table, rows) in &sub.tables {
        let rows = rows.sorted();
        let tensor = Tensor {
            shape: vec![rows.len(), rows.width],
            data: rows.values,
        };
        out.0.insert(table.clone(), tensor);
    }
    out
}

/// The sparse update of a local-table module: `delta` (its change, as [`local_weights`] names and
/// shapes it) with each table's rows given back their global ids from `sub`.
pub fn rows_update(mut delta: NamedTensors, sub: &SparseTensors) -> Result<SparseTensors, SubmodelError> {
    let mut tables = BTreeMap::new();
    for (table, rows) in &sub.tables {
        let change = delta
            .0
            .remove(table)
            .ok_or_else(|| SubmodelError::MissingTensor(table.clone()))?;
        let expected = vec![rows.len(), rows.width];
        if change.shape != expected {
            return Err(SubmodelError::Shape {
                table: table.clone(),
                expected,
                found: change.shape,
            });
        }
        let mut ids = rows.ids.clone();
        ids.sort_unstable();
        let update = SparseRows {
            ids,
            values: change.data,
            width: rows.width,
        };
        tables.insert(table.clone(), update);
    }
    Ok(SparseTensors { dense: delta, tables })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submodel() -> SparseTensors {
        let mut rows = SparseRows::new(2);
        // Out of order on purpose: the local table is in id order.
        rows.push(9, &[9.0, 9.5]);
        rows.push(3, &[3.0, 3.5]);
        let dense = NamedTensors(BTreeMap::from([(
            "out.bias".to_string(),
            Tensor {
                shape: vec![1],
                data: vec![0.5],
            },
        )]));
        SparseTensors {
            dense,
            tables: BTreeMap::from([("emb.weight".to_string(), rows)]),
        }
    }

    #[test]
    fn a_local_table_holds_the_rows_in_id_order_and_its_change_goes_back_to_those_ids() {
        let sub = submodel();
        let local = local_weights(&sub);
        assert_eq!(local.0["emb.weight"].shape, vec![2, 2]);
        assert_eq!(local.0["emb.weight"].data, vec![3.0, 3.5, 9.0, 9.5]);
        assert_eq!(local.0["out.bias"].data, vec![0.5]);

        let mut delta = local.clone();
        delta.0.get_mut("emb.weight").unwrap().data = vec![0.1, 0.2, 0.3, 0.4];
        let update = rows_update(delta, &sub).unwrap();
        let rows = &update.tables["emb.weight"];
        assert_eq!(rows.ids, vec![3, 9]);
        assert_eq!(rows.row(0), &[0.1, 0.2]);
        assert_eq!(rows.row(1), &[0.3, 0.4]);
        assert_eq!(update.dense.0.keys().collect::<Vec<_>>(), vec!["out.bias"]);
    }

    #[test]
    fn a_table_of_the_wrong_size_or_unordered_rows_are_refused() {
        let sub = submodel();
        let mut delta = local_weights(&sub);
        delta.0.get_mut("emb.weight").unwrap().shape = vec![1, 4];
        assert!(matches!(
            rows_update(delta, &sub),
            Err(SubmodelError::Shape { .. })
        ));
        let rows = BTreeMap::from([("emb.weight".to_string(), vec![4, 4])]);
        assert_eq!(
            check_rows(&rows),
            Err(SubmodelError::UnorderedRows {
                table: "emb.weight".into(),
                previous: 4,
                id: 4
            })
        );
    }
}
