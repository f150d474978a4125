DROP VIEW unified_satisfaction_view;
