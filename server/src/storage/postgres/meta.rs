//! [`MetaStore`](crate::storage::MetaStore) on PostgreSQL.
