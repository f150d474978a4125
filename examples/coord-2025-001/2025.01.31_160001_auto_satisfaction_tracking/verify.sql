-- All four columns exist in the tenant's schema.
SELECT count(*) = 4
  FROM information_schema.columns
 WHERE table_schema = current_schema()
   AND table_name = 'repair_orders'
   AND column_name IN ('satisfaction_rating', 'satisfaction_comments',
                       'satisfaction_survey_sent_at', 'satisfaction_response_method')
