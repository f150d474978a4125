ALTER TABLE repair_orders
  ADD COLUMN satisfaction_rating integer CHECK (satisfaction_rating >= 1 AND satisfaction_rating <= 5),
  ADD COLUMN satisfaction_comments text,
  ADD COLUMN satisfaction_survey_sent_at timestamptz,
  -- how the answer came: 'email', 'sms', 'phone' or 'in_person'
  ADD COLUMN satisfaction_response_method text;

CREATE INDEX idx_repair_orders_satisfaction
  ON repair_orders (business_id, satisfaction_rating, created_at DESC)
  WHERE satisfaction_rating IS NOT NULL;
