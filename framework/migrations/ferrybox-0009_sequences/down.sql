DROP TABLE ferrybox_inbox_gaps;
DROP TABLE ferrybox_inbox_sequences;
DROP TABLE ferrybox_sequence_runs;
DROP TABLE ferrybox_sequence_counters;
DROP TABLE ferrybox_sequence_sources;
