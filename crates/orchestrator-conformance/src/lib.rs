//! The adapter conformance suite: one case per contract bullet of the ports in
//! `orchestrator-core`, run by every adapter (memory, SQLite, PostgreSQL, diesel). Every case is mandatory.
//!
//! An adapter implements [`Harness`] (a fresh, isolated store per case, a way to let the store's
//! clock advance, and a way to write a read-model row inside a checkpoint transaction), then
//! expands [`conformance_tests!`] in a test file, which generates one `#[tokio::test]` per case.
#![deny(missing_docs)]

use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::ports::{
    CheckpointStore, CoordinationStore, DeadLetterId, DeadLetterStore, EventStore, UnitOfWorkStore,
};

pub mod checkpoints;
pub mod coordination;
pub mod dead_letters;
pub mod events;
pub mod streams;
pub mod units_of_work;

/// The store every case runs against.
pub trait ConformanceStore:
    EventStore
    + UnitOfWorkStore
    + CoordinationStore
    + CheckpointStore
    + DeadLetterStore
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> ConformanceStore for T where
    T: EventStore
        + UnitOfWorkStore
        + CoordinationStore
        + CheckpointStore
        + DeadLetterStore
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// The application's unit of work of a harness's store.
pub type UnitOf<H> = <<H as Harness>::Store as UnitOfWorkStore>::UnitOfWork;

/// What an adapter provides to run the suite.
#[async_trait]
pub trait Harness: Send + Sync + Sized + 'static {
    /// The adapter's store, implementing every port.
    type Store: ConformanceStore;

    /// A fresh store with no data, isolated from every other case, with events bucketed into
    /// 8 slots. `None` skips the case (after printing why); adapters that must run (CI) panic instead.
    async fn start() -> Option<Self>;

    /// The store under test.
    fn store(&self) -> &Self::Store;

    /// Lets at least `by` pass on the store's clock (a manual clock moves; a database is waited for).
    async fn advance(&self, by: Duration);

    /// Writes a read-model row inside a checkpoint transaction.
    async fn put_row(&self, tx: &mut <Self::Store as CheckpointStore>::Tx, key: &str, value: &str);

    /// Reads a committed read-model row.
    async fn get_row(&self, key: &str) -> Option<String>;

    /// Writes an application row (same table as [`Harness::put_row`]) inside a unit of work.
    async fn put_row_in_unit(&self, unit: &mut UnitOf<Self>, key: &str, value: &str);

    /// Whether two writing transactions can be open at once (false on SQLite, whose single write
    /// lock a unit of work holds from its start).
    const CONCURRENT_WRITERS: bool = true;

    /// Opens, in another session, a transaction that has written to a table other than the events
    /// table and stays open until the returned guard is dropped; `None` where the store has no
    /// other sessions (memory). On SQLite it holds a read snapshot instead (a write would lock
    /// out every append).
    async fn hold_foreign_transaction(&self) -> Option<Box<dyn std::any::Any + Send>> {
        None
    }

    /// Waits until every event appended so far is visible to readers. Stores whose readers hold
    /// back behind running transactions (PostgreSQL's horizon) wait for them; others return at once.
    async fn settle(&self) {}

    /// The ids in the store's log of skipped dead letters (which the port never reads back), in
    /// any order. Every adapter's conformance harness reads it (its table, or the memory store's
    /// log); `None`, the default, is for harnesses built for other tests, and skips that check.
    async fn skipped_letters(&self) -> Option<Vec<DeadLetterId>> {
        None
    }

    /// Cleans up after a case that passed (a failed case leaves its data for inspection).
    async fn finish(self) {}
}

/// The slot count every harness buckets events into.
pub const SLOTS: u32 = 8;

/// How long leases last in the cases; short so that SQL stores wait little.
pub const LEASE: Duration = Duration::from_millis(300);

/// Expands to one `#[tokio::test]` per conformance case for the harness type `$harness`.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:ty) => {
        $crate::conformance_tests!(@cases $harness;
            events::append_assigns_versions_and_positions,
            events::append_no_stream_conflicts_when_stream_exists,
            events::append_exact_version_conflicts_when_version_differs,
            events::append_any_never_conflicts,
            events::duplicate_event_id_is_rejected_and_nothing_is_written,
            events::empty_append_writes_nothing,
            events::slot_is_hash_of_aggregate_id,
            events::read_returns_only_requested_slots_after_their_cursors,
            events::read_filters_by_scope,
            events::read_pages_with_limit_in_position_order,
            events::read_at_differing_cursors_returns_the_first_events_after_each,
            events::read_keeps_version_order_per_stream,
            events::backlog_counts_events_after_the_cursors_in_scope,
            events::head_is_the_last_committed_position,
            streams::read_stream_returns_one_stream_in_version_order,
            streams::read_stream_sees_an_append_at_once_whatever_else_is_open,
            streams::partition_key_is_fixed_at_the_first_append,
            streams::aggregates_sharing_a_partition_key_share_a_slot_in_append_order,
            streams::malformed_appends_are_refused_and_write_nothing,
            units_of_work::unit_of_work_commits_appends_and_rows_together,
            units_of_work::dropped_unit_of_work_keeps_nothing,
            units_of_work::undeclared_stream_is_refused,
            units_of_work::unit_of_work_checks_versions_like_append,
            units_of_work::racing_units_of_work_keep_one_stream_in_version_order,
            units_of_work::units_of_work_on_the_same_streams_in_any_order_do_not_deadlock,
            coordination::register_creates_replica_set_and_checks_slot_count,
            coordination::register_again_fences_the_previous_incarnation,
            coordination::heartbeat_of_unknown_incarnation_is_refused,
            coordination::snapshot_of_unknown_replica_set_is_refused,
            coordination::lease_goes_to_first_heartbeat_and_changes_hands_only_after_expiry,
            coordination::ages_are_measured_by_the_store_clock,
            coordination::create_generation_is_compare_and_set,
            coordination::create_generation_requires_the_lease,
            coordination::create_generation_checks_slot_epochs,
            coordination::handoff_then_release_moves_the_slot_and_bumps_the_epoch,
            coordination::release_by_a_non_owner_is_fenced,
            coordination::ack_generation_never_goes_back,
            coordination::deregister_frees_slots_and_the_lease,
            coordination::deregister_cancels_handoffs_to_the_leaver,
            coordination::evicted_workers_are_removed,
            checkpoints::unknown_checkpoints_start_at_the_beginning,
            checkpoints::commit_advances_checkpoints_and_read_model_together,
            checkpoints::stale_epoch_is_fenced_and_read_model_writes_roll_back,
            checkpoints::slot_outside_the_fence_is_fenced,
            checkpoints::checkpoints_never_move_backwards,
            checkpoints::dropped_transaction_keeps_nothing,
            checkpoints::checkpoints_are_per_replica_set_and_projection,
            checkpoints::reset_rebuilds_one_projection_and_fences_running_owners,
            checkpoints::remove_forgets_one_projection,
            checkpoints::stopped_projections_are_recorded_until_resumed,
            dead_letters::parked_letters_are_kept_only_when_the_commit_succeeds,
            dead_letters::parking_again_keeps_the_letter_and_adds_attempts,
            dead_letters::parked_keys_are_listed_per_slot,
            dead_letters::dead_letters_are_listed_filtered_and_counted,
            dead_letters::requests_mark_whole_keys,
            dead_letters::parked_events_are_whole_events_in_position_order,
            dead_letters::resolve_deletes_one_key_on_commit_and_logs_skips,
            dead_letters::reset_and_remove_delete_the_projections_letters,
            dead_letters::dead_letters_are_per_replica_set,
        );
    };
    (@cases $harness:ty; $($module:ident :: $case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let Some(harness) = <$harness as $crate::Harness>::start().await else {
                    return;
                };
                $crate::$module::$case(&harness).await;
                $crate::Harness::finish(harness).await;
            }
        )*
    };
}
