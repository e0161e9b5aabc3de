-- Provenance (docs/contracts.md §5): the route and the routes version that sent each record to
-- RabbitMQ. Null for rows written before routes had versions (the built-in routes applied).
alter table records add column if not exists route text;
alter table records add column if not exists routes_version text;
