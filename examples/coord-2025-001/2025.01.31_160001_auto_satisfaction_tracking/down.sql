DROP INDEX idx_repair_orders_satisfaction;
ALTER TABLE repair_orders
  DROP COLUMN satisfaction_rating,
  DROP COLUMN satisfaction_comments,
  DROP COLUMN satisfaction_survey_sent_at,
  DROP COLUMN satisfaction_response_method;
