-- The sent log: published rows are kept for a retention window, then deleted oldest first in
-- small batches. This index finds the expired ones without scanning the unpublished backlog.
CREATE INDEX ferrybox_outbox_published_at ON ferrybox_outbox (published_at)
    WHERE published_at IS NOT NULL;

-- `outbox status` counts rows the broker refused so far.
CREATE INDEX ferrybox_outbox_errors ON ferrybox_outbox (id)
    WHERE published_at IS NULL AND last_error IS NOT NULL;
