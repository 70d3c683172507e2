//! [`RepoStore`](crate::storage::repo::RepoStore) on PostgreSQL.
