import ChatBridgeCore
import Foundation

/// `chatbridge usage`: recorded usage summed by user, chat, model, key or day, with estimated cost, as a
/// table, CSV or JSON.
public struct UsageReport: Sendable {
    public enum Format: String, Sendable, CaseIterable { case table, csv, json }

    public var since: String
    public var until: String
    public var grouping: UsageGrouping
    public var rows: [UsageTotal]
    public var total: UsageTotal

    public init(since: String, until: String, grouping: UsageGrouping, rows: [UsageTotal], total: UsageTotal) {
        self.since = since
        self.until = until
        self.grouping = grouping
        self.rows = rows
        self.total = total
    }

    /// Reads the report from a ledger.
    public static func make(ledger: any UsageLedger, since: String, until: String, grouping: UsageGrouping) async throws -> UsageReport {
        let rows = try await ledger.usage(UsageQuery(since: since, until: until, grouping: grouping))
        let total = try await ledger.usage(UsageQuery(since: since, until: until, grouping: .total)).first
            ?? UsageTotal(group: "total", answers: 0, promptTokens: 0, completionTokens: 0, cost: 0)
        return UsageReport(since: since, until: until, grouping: grouping, rows: rows, total: total)
    }

    static func cost(_ value: Double) -> String { String(format: "%.4f", value) }

    public func render(_ format: Format) -> String {
        let header = [grouping.rawValue, "answers", "prompt_tokens", "completion_tokens", "total_tokens", "cost"]
        func fields(_ row: UsageTotal) -> [String] {
            [row.group, "\(row.answers)", "\(row.promptTokens)", "\(row.completionTokens)", "\(row.tokens)", Self.cost(row.cost)]
        }
        switch format {
        case .csv:
            func escape(_ field: String) -> String {
                // A leading = + - @ would be read as a formula by spreadsheets.
                var value = field
                if let first = value.first, "=+-@".contains(first), Double(value) == nil { value = "'" + value }
                return value.contains(where: { $0 == "," || $0 == "\"" || $0.isNewline }) || value != field
                    ? "\"" + value.replacingOccurrences(of: "\"", with: "\"\"") + "\"" : value
            }
            let lines = [header] + rows.map(fields) + [fields(UsageTotal(group: "total", answers: total.answers, promptTokens: total.promptTokens, completionTokens: total.completionTokens, cost: total.cost))]
            return lines.map { $0.map(escape).joined(separator: ",") }.joined(separator: "\n") + "\n"
        case .json:
            func object(_ row: UsageTotal) -> [String: Any] {
                ["group": row.group, "answers": row.answers, "prompt_tokens": row.promptTokens, "completion_tokens": row.completionTokens,
                 "total_tokens": row.tokens, "cost": (row.cost * 10_000).rounded() / 10_000]
            }
            let document: [String: Any] = [
                "since": since, "until": until, "by": grouping.rawValue, "rows": rows.map(object), "total": object(total),
            ]
            let data = (try? JSONSerialization.data(withJSONObject: document, options: [.prettyPrinted, .sortedKeys])) ?? Data()
            return String(decoding: data, as: UTF8.self) + "\n"
        case .table:
            let body = rows.map(fields)
            let footer = fields(UsageTotal(group: "total", answers: total.answers, promptTokens: total.promptTokens, completionTokens: total.completionTokens, cost: total.cost))
            let all = [header] + body + [footer]
            let widths = header.indices.map { column in all.map { $0[column].count }.max() ?? 0 }
            func line(_ fields: [String]) -> String {
                fields.enumerated().map { index, field in
                    let pad = String(repeating: " ", count: widths[index] - field.count)
                    return index == 0 ? field + pad : pad + field
                }.joined(separator: "  ")
            }
            let rule = widths.map { String(repeating: "-", count: $0) }.joined(separator: "  ")
            var text = "usage from \(since) to \(until), by \(grouping.rawValue)\n"
            text += ([line(header), rule] + body.map(line) + [rule, line(footer)]).joined(separator: "\n") + "\n"
            return text
        }
    }
}
