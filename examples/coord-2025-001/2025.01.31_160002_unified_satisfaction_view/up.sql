CREATE VIEW unified_satisfaction_view AS
WITH satisfaction_data AS (
    -- Home Services satisfaction
    SELECT business_id,
           'home_services' AS industry,
           'work_order' AS transaction_type,
           id AS transaction_id,
           customer_id,
           satisfaction_rating,
           satisfaction_comments,
           satisfaction_survey_sent_at,
           satisfaction_response_method,
           created_at AS transaction_date,
           total_amount AS transaction_value
      FROM work_orders
     WHERE satisfaction_rating IS NOT NULL

    UNION ALL

    -- Automotive satisfaction
    SELECT business_id,
           'automotive' AS industry,
           'repair_order' AS transaction_type,
           id AS transaction_id,
           customer_id,
           satisfaction_rating,
           satisfaction_comments,
           satisfaction_survey_sent_at,
           satisfaction_response_method,
           created_at AS transaction_date,
           total_amount AS transaction_value
      FROM repair_orders
     WHERE satisfaction_rating IS NOT NULL
)
SELECT *,
       CASE
           WHEN satisfaction_rating >= 4 THEN 'promoter'
           WHEN satisfaction_rating = 3 THEN 'passive'
           ELSE 'detractor'
       END AS nps_category
  FROM satisfaction_data;
