-- The table of docs/contracts.md §5: one row per record, keyed by the record's id.
create table if not exists records (
    id          uuid        primary key,
    source      text        not null,
    seq         bigint      not null,
    ts          timestamptz not null,
    value       smallint    not null check (value between 0 and 100),
    hash        char(2)     not null,
    received_at timestamptz not null default now()
);

-- `verify` and operators look records up by source and seq.
create index if not exists records_source_seq on records (source, seq);
